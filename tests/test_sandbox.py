"""The decode sandbox survives decoders that hang, eat memory or crash, and prepares scans as in-process."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import decode as decode_stage
from edge_runtime.bundle import default_bundle_path, load_bundle
from edge_runtime.decode import DecodeLimits, decode_file
from edge_runtime.errors import CorruptImage, DecodeCrashed, DecodeTimeout, NotAnImage, UnsupportedImage
from edge_runtime.prepare import PrepareOptions, prepare_file
from edge_runtime.preprocess import PreprocessSpec, preprocess
from edge_runtime.reports.preview import fit_image
from edge_runtime.results import pixels_digest
from edge_runtime.sandbox import DecodeSandbox

#: A small model input (what the sandbox computes is checked against the same calls in-process).
OPTIONS = PrepareOptions(PreprocessSpec(height=32, width=32), DecodeLimits())

SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture()
def misbehaving_plugins():
    saved = decode_stage.registered_decoders()
    decode_stage.register_decoder("hang", "plugins.misbehaving:HangingDecoder", first=True)
    decode_stage.register_decoder("greedy", "plugins.misbehaving:GreedyDecoder", first=True)
    decode_stage.register_decoder("crash", "plugins.misbehaving:CrashingDecoder", first=True)
    yield
    decode_stage.use_registry(saved)


def test_sandbox_prepares_exactly_as_decode_then_preprocess(shared_data: Path):
    """The child hands back the sample, digest and preview, bit-identical to the in-process calls."""
    spec = load_bundle(default_bundle_path()).preprocessing
    options = PrepareOptions(spec, DecodeLimits(), preview_side=512)
    sandbox = DecodeSandbox(timeout_s=30)
    try:
        for rel in (SIIM, "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg"):
            inside = sandbox.prepare(shared_data / rel, options)
            direct = decode_file(shared_data / rel)
            assert inside.sample is not None and inside.sample.shape == spec.sample_shape
            assert np.array_equal(inside.sample, preprocess(direct.pixels, spec))
            assert inside.preview is not None and max(inside.preview.shape) <= 512
            assert np.array_equal(inside.preview, fit_image(direct.pixels, 512))
            assert inside.shape == direct.pixels.shape
            assert inside.metadata == direct.metadata
            assert (inside.kind, inside.decoder) == (direct.kind, direct.decoder)
            if direct.metadata.get("sop_instance_uid"):
                assert inside.pixels_sha256 == pixels_digest(direct.pixels)
            else:
                assert inside.pixels_sha256 is None
            in_process = prepare_file(shared_data / rel, options)
            assert np.array_equal(in_process.sample, inside.sample)
            assert in_process.pixels_sha256 == inside.pixels_sha256
        no_preview = sandbox.prepare(shared_data / SIIM, PrepareOptions(spec, DecodeLimits()))
        assert no_preview.preview is None and no_preview.sample is not None
    finally:
        sandbox.close()


def test_a_preprocessing_failure_is_carried_back_then_raised(misbehaving_plugins, tmp_path: Path):
    """Carried back, not raised in the child: the service checks the intake policy first."""
    decode_stage.register_decoder("colour", "plugins.misbehaving:ColourDecoder", first=True)
    decode_stage.register_decoder("text", "plugins.misbehaving:TextPixelsDecoder", first=True)
    (tmp_path / "colour.bin").write_bytes(b"COLOUR\n" + b"x" * 100)
    (tmp_path / "text.bin").write_bytes(b"TEXT\n" + b"x" * 100)
    sandbox = DecodeSandbox(timeout_s=30)
    try:
        for prepared in (
            sandbox.prepare(tmp_path / "colour.bin", OPTIONS),
            prepare_file(tmp_path / "colour.bin", OPTIONS),
        ):
            assert prepared.sample is None and prepared.shape == (8, 8, 3)
            with pytest.raises(UnsupportedImage, match="2-D grey image"):
                prepared.sample_or_raise()
        text = sandbox.prepare(tmp_path / "text.bin", OPTIONS)
        with pytest.raises(
            UnsupportedImage, match=r"text\.bin cannot be preprocessed: .*shape \(8, 8\), dtype object"
        ):
            text.sample_or_raise()
        assert sandbox.restarts == 0
    finally:
        sandbox.close()


def test_typed_errors_cross_the_process_boundary(tmp_path: Path):
    (tmp_path / "notes.dcm").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    sandbox = DecodeSandbox()
    try:
        with pytest.raises(NotAnImage, match=r"notes\.dcm"):
            sandbox.prepare(tmp_path / "notes.dcm", OPTIONS)
        with pytest.raises(CorruptImage, match="empty"):
            sandbox.prepare(tmp_path / "empty.png", OPTIONS)
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
            sandbox.prepare(tmp_path / "hang.bin", OPTIONS)
        assert time.monotonic() - t0 < 5
        assert sandbox.prepare(good, OPTIONS).shape == (224, 224)
        sandbox.timeout_s = 60  # filling 1 GB can be slow on a busy 2-core box
        with pytest.raises(DecodeCrashed, match="more than 1024 MB"):
            sandbox.prepare(tmp_path / "greedy.bin", OPTIONS)
        assert sandbox.prepare(good, OPTIONS).shape == (224, 224)
        with pytest.raises(DecodeCrashed, match="SIGSEGV"):
            sandbox.prepare(tmp_path / "crash.bin", OPTIONS)
        assert sandbox.prepare(good, OPTIONS).shape == (224, 224)
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
            sandbox.prepare(tmp_path / "bug.dcm", OPTIONS)
        assert not isinstance(info.value, InputError)  # retried, then quarantined as our failure
        assert "support" in info.value.action
        with pytest.raises(CorruptImage, match="JSONDecodeError"):
            sandbox.prepare(tmp_path / "choke.dcm", OPTIONS)
    finally:
        sandbox.close()


def test_the_heap_is_kept_through_a_burst_and_returned_when_idle(shared_data: Path):
    """Pages stay between scans (no page faults for the next image), then go back once idle."""
    from edge_runtime import sandbox as sandbox_module

    def rss_mb(pid: int) -> float:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024

    sandbox = DecodeSandbox(timeout_s=60)
    try:
        chest = shared_data / "dicom/pydicom_data/RG1_UNCR.dcm"  # 1955x1841: ~30 MB of buffers
        sandbox.prepare(chest, OPTIONS)
        sandbox.prepare(chest, OPTIONS)
        pid = sandbox._proc.pid
        busy = rss_mb(pid)
        deadline = time.monotonic() + sandbox_module.IDLE_TRIM_S + 10
        idle = busy
        while time.monotonic() < deadline and busy - idle < 15:
            time.sleep(0.2)
            idle = rss_mb(pid)
        assert busy - idle >= 15, f"the idle child kept {idle:.0f} MB (busy: {busy:.0f} MB)"
    finally:
        sandbox.close()


def _decoder_children() -> list[int]:
    """Processes named ``edge-decoder`` (edge_runtime.procname) that are children of a forkserver of ours."""
    import os

    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "comm").read_text().strip() == "edge-decoder":
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_decode_processes_shares_few_decoder_children_between_workers(tmp_path: Path) -> None:
    """``Decode.Processes`` 1: four threads decode at once through ONE child (each waits for it free).

    The child names itself ``edge-decoder``, so ``ps`` and benchmarks/bench_memory.py can tell it from
    the report child and the forkserver; with the default (0), each thread has a child of its own.
    """
    import threading

    import cv2

    from edge_runtime.pipeline import ScanAnalyzer

    scans = []
    for i in range(4):
        path = tmp_path / f"scan-{i}.png"
        grey = (np.add.outer(np.arange(256), np.arange(256)) // 2 + i).astype(np.uint8)
        assert cv2.imwrite(str(path), grey)
        scans.append(path)
    before = set(_decoder_children())
    for processes, expected in ((1, 1), (0, 4)):
        analyzer = ScanAnalyzer.from_bundle_path(default_bundle_path(), "onnxruntime", isolate=True)
        analyzer.decode_processes = processes
        outcomes: list[object] = []
        try:
            run = analyzer.analyze
            threads = [threading.Thread(target=lambda p=p, r=run, o=outcomes: o.append(r(p))) for p in scans]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(outcomes) == 4
            assert len(analyzer._sandboxes) == expected
            assert len(set(_decoder_children()) - before) == expected  # each child is named edge-decoder
        finally:
            analyzer.close()
        time.sleep(0.5)  # the closed children are gone before the next count
        before = set(_decoder_children())
