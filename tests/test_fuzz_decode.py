"""Fuzz the decode entry point with mutated real files (Hypothesis).

Every mutated file must either become a sane prepared scan (decoded,
preprocessed for the bundled model, its heat-map preview shrunk) or raise one
of the project's typed ``InputError``s: no other exception, no hang, no
unbounded allocation. It goes through the same :class:`DecodeSandbox` the
service uses, because this fuzzer's first finding was a file on which GDCM
calls ``abort()``: in-process, that kills the whole service; in the sandbox
it becomes ``DecodeCrashed`` and the file is quarantined. The test also
counts how often the sandbox had to contain a crash or a hang.

Marked ``slow``; the example count is bounded (FUZZ_EXAMPLES, default 3000: about 20 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.bundle import default_bundle_path, load_bundle
from edge_runtime.decode import DecodeLimits
from edge_runtime.errors import InputError
from edge_runtime.prepare import PrepareOptions
from edge_runtime.sandbox import DecodeSandbox

pytestmark = [
    pytest.mark.slow,
    # Hypothesis warns that a falsifying example's repr is large; as an error that warning
    # would hide the failure it is reporting.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning"),
]

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SEEDS = [
    "dicom/pydicom_testfiles/MR_small.dcm",
    "dicom/pydicom_testfiles/MR_small_implicit.dcm",
    "dicom/pydicom_testfiles/MR_small_expb.dcm",
    "dicom/pydicom_testfiles/MR_small_RLE.dcm",
    "dicom/pydicom_testfiles/MR_small_jp2klossless.dcm",
    "dicom/pydicom_testfiles/MR_small_jpeg_ls_lossless.dcm",
    "dicom/pydicom_testfiles/JPGExtended.dcm",
    "dicom/pydicom_testfiles/SC_rgb_jpeg_dcmtk.dcm",
    "dicom/pydicom_testfiles/CR1_6154_cspine_16x16.dcm",
    "dicom/pydicom_testfiles/image_dfl.dcm",
    "dicom/pydicom_testfiles/CT_small.dcm",
    "dicom/pydicom_data/vlut_04.dcm",
    "dicom/fo_dicom_via_dcmfx/CR-MONO1-10-chest.dcm",
    "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg",
    "cxr/nih1000_64/test/0_normal/",
]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "3000"))
LIMITS = DecodeLimits(max_pixels=4_000_000)
SPEC = load_bundle(default_bundle_path()).preprocessing
OPTIONS = PrepareOptions(SPEC, LIMITS, preview_side=512)
PER_EXAMPLE_TIMEOUT_S = 20


def _seed_bytes() -> list[bytes]:
    if not DATA.is_dir():
        return []
    seeds = []
    for rel in SEEDS:
        path = DATA / rel
        if path.is_dir():
            path = sorted(path.glob("*.png"))[0]
        seeds.append(path.read_bytes())
    return seeds


SEED_BYTES = _seed_bytes()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_BYTES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            # Bias towards the header, where lengths and dimensions live.
            pos = draw(st.integers(0, min(len(data) - 1, 1500)))
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 256))]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 512))]
    return bytes(data)


@pytest.fixture(scope="module")
def sandbox():
    box = DecodeSandbox(timeout_s=PER_EXAMPLE_TIMEOUT_S, memory_limit_mb=2048)
    yield box
    print(f"\nfuzz: the sandbox contained {box.restarts} decoder crash(es)/hang(s)")
    box.close()


@pytest.mark.skipif(not SEED_BYTES, reason="real seed files not found in ../shared/data")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(data=mutated())
def test_mutated_real_files_never_escape_the_typed_errors(tmp_path_factory, sandbox, data):
    path = tmp_path_factory.mktemp("fuzz") / "input.bin"
    path.write_bytes(data)
    try:
        prepared = sandbox.prepare(path, OPTIONS)
        sample = prepared.sample_or_raise()
    except InputError as exc:
        assert exc.message and exc.action
        return
    assert len(prepared.shape) == 2 and int(np.prod(prepared.shape)) <= LIMITS.max_pixels
    assert sample.shape == SPEC.sample_shape and sample.dtype == np.float32
    assert np.isfinite(sample).all()
    assert prepared.preview is not None and max(prepared.preview.shape) <= 512
    assert np.isfinite(prepared.preview).all()
    assert prepared.preview.min() >= 0.0 and prepared.preview.max() <= 1.0
