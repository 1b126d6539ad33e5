"""Properties of the shared preprocessing (numpy only; training uses the same function)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_runtime.errors import ModelBundleError, UnsupportedImage
from edge_runtime.preprocess import PreprocessSpec, preprocess

SPECS = [
    PreprocessSpec(height=32, width=32),
    PreprocessSpec(height=24, width=40, resize="letterbox", channels=1, layout="NHWC"),
    PreprocessSpec(
        height=20,
        width=20,
        resize="center_crop",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        quantize_8bit=False,
    ),
]


@settings(max_examples=60, deadline=None)
@given(
    image=arrays(
        np.float32,
        st.tuples(st.integers(1, 90), st.integers(1, 90)),
        elements=st.floats(-2, 3, width=32) | st.just(float("nan")),
    ),
    spec_index=st.integers(0, len(SPECS) - 1),
)
def test_output_shape_dtype_and_range_for_any_image(image, spec_index):
    spec = SPECS[spec_index]
    out = preprocess(image, spec)
    assert out.shape == spec.sample_shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    mean = np.broadcast_to(np.asarray(spec.mean, np.float32), (spec.channels,))
    std = np.broadcast_to(np.asarray(spec.std, np.float32), (spec.channels,))
    planes = out if spec.layout == "NCHW" else np.moveaxis(out, -1, 0)
    for c in range(spec.channels):
        lo, hi = (0 - mean[c]) / std[c], (1 - mean[c]) / std[c]
        assert planes[c].min() >= lo - 1e-5 and planes[c].max() <= hi + 1e-5
    # Deterministic: the same input always gives the same bytes.
    assert np.array_equal(out, preprocess(image, spec))


def test_preallocated_buffer_is_filled_in_place():
    spec = SPECS[0]
    image = np.linspace(0, 1, 50 * 60, dtype=np.float32).reshape(50, 60)
    buf = np.full(spec.sample_shape, 7.0, dtype=np.float32)
    out = preprocess(image, spec, out=buf)
    assert out is buf and np.array_equal(buf, preprocess(image, spec))
    assert np.array_equal(buf[0], buf[1]) and np.array_equal(buf[1], buf[2])


def test_spec_round_trips_and_hash_is_stable():
    spec = SPECS[2]
    again = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.sha256 == spec.sha256
    assert PreprocessSpec().sha256 != PreprocessSpec(height=225).sha256


def test_invalid_specs_and_images_are_refused():
    with pytest.raises(ModelBundleError, match="channels must be 1 or 3"):
        PreprocessSpec(channels=2)
    with pytest.raises(ModelBundleError, match="Unknown preprocessing keys"):
        PreprocessSpec.from_dict({"height": 10, "gamma": 2})
    with pytest.raises(UnsupportedImage):
        preprocess(np.zeros((4, 4, 3), np.float32), PreprocessSpec())


def test_edge_runtime_never_imports_torch():
    code = (
        "import sys, pkgutil, importlib, edge_runtime\n"
        "for m in pkgutil.walk_packages(edge_runtime.__path__, 'edge_runtime.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_spec_built_with_lists_equals_spec_built_with_tuples():
    assert PreprocessSpec(mean=[0.5], std=[0.5]) == PreprocessSpec(mean=(0.5,), std=(0.5,))
    assert PreprocessSpec(mean=[0.5]).sha256 == PreprocessSpec().sha256
