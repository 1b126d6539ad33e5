"""The decode sandbox survives decoders that hang, eat memory or crash."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import decode as decode_stage
from edge_runtime.decode import DecodeLimits, decode_file
from edge_runtime.errors import CorruptImage, DecodeCrashed, DecodeTimeout, NotAnImage
from edge_runtime.sandbox import DecodeSandbox

SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture()
def misbehaving_plugins():
    saved = decode_stage.registered_decoders()
    decode_stage.register_decoder("hang", "plugins.misbehaving:HangingDecoder", first=True)
    decode_stage.register_decoder("greedy", "plugins.misbehaving:GreedyDecoder", first=True)
    decode_stage.register_decoder("crash", "plugins.misbehaving:CrashingDecoder", first=True)
    yield
    decode_stage.use_registry(saved)


def test_sandbox_decodes_like_in_process(shared_data: Path):
    sandbox = DecodeSandbox(timeout_s=30)
    try:
        for rel in (SIIM, "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg"):
            inside = sandbox.decode(shared_data / rel, DecodeLimits())
            direct = decode_file(shared_data / rel)
            assert np.array_equal(inside.pixels, direct.pixels)
            assert inside.metadata == direct.metadata
    finally:
        sandbox.close()


def test_typed_errors_cross_the_process_boundary(tmp_path: Path):
    (tmp_path / "notes.dcm").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    sandbox = DecodeSandbox()
    try:
        with pytest.raises(NotAnImage, match=r"notes\.dcm"):
            sandbox.decode(tmp_path / "notes.dcm", DecodeLimits())
        with pytest.raises(CorruptImage, match="empty"):
            sandbox.decode(tmp_path / "empty.png", DecodeLimits())
        assert sandbox.restarts == 0
    finally:
        sandbox.close()


def test_hang_memory_and_crash_are_contained(misbehaving_plugins, shared_data: Path, tmp_path: Path):
    (tmp_path / "hang.bin").write_bytes(b"HANG\n" + b"x" * 100)
    (tmp_path / "greedy.bin").write_bytes(b"GREEDY\n" + b"x" * 100)
    (tmp_path / "crash.bin").write_bytes(b"CRASH\n" + b"x" * 100)
    sandbox = DecodeSandbox(timeout_s=1.5, memory_limit_mb=1024)
    good = shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg"
    try:
        t0 = time.monotonic()
        with pytest.raises(DecodeTimeout, match=r"hang\.bin"):
            sandbox.decode(tmp_path / "hang.bin", DecodeLimits())
        assert time.monotonic() - t0 < 5
        assert sandbox.decode(good, DecodeLimits()).pixels.shape == (224, 224)
        sandbox.timeout_s = 60  # filling 1 GB can be slow on a busy 2-core box
        with pytest.raises(DecodeCrashed, match="more than 1024 MB"):
            sandbox.decode(tmp_path / "greedy.bin", DecodeLimits())
        assert sandbox.decode(good, DecodeLimits()).pixels.shape == (224, 224)
        with pytest.raises(DecodeCrashed, match="SIGSEGV"):
            sandbox.decode(tmp_path / "crash.bin", DecodeLimits())
        assert sandbox.decode(good, DecodeLimits()).pixels.shape == (224, 224)
        assert sandbox.restarts == 3
    finally:
        sandbox.close()


def test_a_bug_of_ours_is_not_blamed_on_the_file(misbehaving_plugins, tmp_path: Path):
    """It used to be 'corrupt image, resend' whatever failed in the decoder child."""
    from edge_runtime.errors import DecoderFault, InputError

    decode_stage.register_decoder("buggy", "plugins.misbehaving:BuggyDecoder", first=True)
    decode_stage.register_decoder("choking", "plugins.misbehaving:ChokingLibraryDecoder", first=True)
    (tmp_path / "bug.dcm").write_bytes(b"BUGGY\n" + b"x" * 100)
    (tmp_path / "choke.dcm").write_bytes(b"CHOKE\n{not json")
    sandbox = DecodeSandbox(timeout_s=30)
    try:
        with pytest.raises(DecoderFault, match="fault of the runtime") as info:
            sandbox.decode(tmp_path / "bug.dcm", DecodeLimits())
        assert not isinstance(info.value, InputError)  # retried, then quarantined as our failure
        assert "support" in info.value.action
        with pytest.raises(CorruptImage, match="JSONDecodeError"):
            sandbox.decode(tmp_path / "choke.dcm", DecodeLimits())
    finally:
        sandbox.close()
