"""The one scoring path (training.evaluate.scoring) on the real bundled model.

Training, its reports and the accuracy benchmarks read P(positive) through
the edge's ONNX Runtime backend and the manifest's head. These tests hold
that path to the one it replaced (a bare ONNX Runtime session, column of the
positive label) on the bundled INT8 model and its conformance images, and
check the seam that loads a model file before a bundle exists.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.backends.onnx import OnnxRuntimeBackend
from edge_runtime.bundle import ModelBundle, load_bundle
from edge_runtime.errors import ModelBundleError
from edge_runtime.preprocess import preprocess
from edge_runtime.results import positive_probabilities
from training.evaluate.scoring import OutputHead, bundle_scorer, file_scorer, run_head, score_file


@pytest.fixture(scope="module")
def bundle(default_bundle: Path) -> ModelBundle:
    return load_bundle(default_bundle)


@pytest.fixture(scope="module")
def samples(bundle: ModelBundle) -> np.ndarray:
    """The bundle's conformance images, rebuilt into input tensors as a box does."""
    with np.load(bundle.path / "conformance.npz") as refs:
        images = refs["images"]
    scale = np.float32(255.0) if images.dtype == np.uint8 else np.float32(1.0)
    return np.stack([preprocess(img.astype(np.float32) / scale, bundle.preprocessing) for img in images])


def _bare_session(path: Path, samples: np.ndarray, column: int) -> np.ndarray:
    """The set-up training and the benchmarks used before: a plain session, one output column."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: samples[i : i + 8]})[0][:, column] for i in range(0, len(samples), 8)]
    )


def test_bundle_scorer_matches_the_old_session_path(bundle: ModelBundle, samples: np.ndarray) -> None:
    column = bundle.labels.index(bundle.positive_label)
    old = _bare_session(bundle.artifact("onnxruntime").path, samples, column)
    with bundle_scorer(bundle, threads=1) as scorer:
        new = scorer(samples, batch_size=5)  # batches of 5: a short last batch too
    assert new.shape == (len(samples),)
    # Only float32 vs float64 rounding of the larger class (1 - P(smaller)) may differ.
    np.testing.assert_allclose(new, old, atol=1e-6)
    # And it is what the conformance check stored for this backend on the build machine.
    with np.load(bundle.path / "conformance.npz") as refs:
        np.testing.assert_allclose(new, refs["expected_onnxruntime"], atol=1e-5)


def test_file_scorer_reads_a_model_file_like_the_bundle(bundle: ModelBundle, samples: np.ndarray) -> None:
    head = OutputHead.from_bundle(bundle)
    with bundle_scorer(bundle, threads=1) as scorer:
        from_bundle = scorer(samples)
    path = bundle.artifact("onnxruntime").path
    from_file = score_file(path, samples, bundle.preprocessing, head, threads=1)
    np.testing.assert_array_equal(from_file, from_bundle)
    # A run before packaging reads the same head from its split.json classes.
    assert run_head({"classes": bundle.labels}) == head
    assert run_head(None) == OutputHead(("NORMAL", "PNEUMONIA"), "PNEUMONIA", "none")


def test_load_model_refuses_a_file_that_does_not_fit(bundle: ModelBundle, tmp_path: Path) -> None:
    path = shutil.copy(bundle.artifact("onnxruntime").path, tmp_path / "model.onnx")
    backend = OnnxRuntimeBackend()
    with pytest.raises(ModelBundleError, match="names its input 'input'"):
        backend.load_model(path, input_name="pixels")
    with pytest.raises(ModelBundleError, match="input shape"):
        backend.load_model(path, input_name="input", sample_shape=(3, 64, 64))
    with pytest.raises(ModelBundleError, match="first output"):
        backend.load_model(path, input_name="input", output_name="logits")
    spec = bundle.preprocessing
    with pytest.raises(ModelBundleError, match="names its input"):
        file_scorer(path, spec, OutputHead.from_bundle(bundle), input_name="pixels")


def test_positive_probabilities_follows_the_manifest_head() -> None:
    raw = np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32)
    # Positive label first: the first column, not a hard-coded column 1.
    p = positive_probabilities(
        raw, labels=["PNEUMONIA", "NORMAL"], positive_label="PNEUMONIA", activation="none"
    )
    assert p.tolist() == pytest.approx([0.2, 0.9])
    p = positive_probabilities(
        raw, labels=["NORMAL", "PNEUMONIA"], positive_label="PNEUMONIA", activation="none"
    )
    assert p.tolist() == pytest.approx([0.8, 0.1])
    # Logits with softmax: softmax([0, ln 3]) = [1/4, 3/4].
    logits = np.array([[0.0, np.log(3.0)]])
    p = positive_probabilities(logits, labels=["a", "b"], positive_label="b", activation="softmax")
    assert p.tolist() == pytest.approx([0.75])
    # One sigmoid output: the only column, whatever the label.
    p = positive_probabilities(
        np.array([[0.0], [np.log(4.0)]]), labels=["x"], positive_label="x", activation="sigmoid"
    )
    assert p.tolist() == pytest.approx([0.5, 0.8])
