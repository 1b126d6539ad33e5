"""Scoring: preprocessed tensors -> P(positive), through the edge's own backend and result code.

What training reports must be what a box computes, so every score in
``training/``, the evaluation reports and the accuracy benchmarks comes
from here: an :class:`~edge_runtime.backends.onnx.OnnxRuntimeBackend`
(the device's session set-up and input checks) turns the batch into raw
output, and :func:`edge_runtime.results.positive_probabilities` turns that
into P(positive) with the manifest's labels, positive label and output
activation. A packaged model is scored from its bundle
(:func:`bundle_scorer`); a file that has no bundle yet (the FP32 export,
a freshly quantized INT8) from the head the manifest will give it
(:func:`run_head`, :func:`file_scorer`).

No torch here: the benchmarks import this next to the edge code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from edge_runtime.backends import Backend
from edge_runtime.backends.onnx import OnnxRuntimeBackend
from edge_runtime.bundle import ModelBundle
from edge_runtime.preprocess import PreprocessSpec
from edge_runtime.results import positive_probabilities

__all__ = [
    "DEFAULT_CLASSES",
    "INPUT_NAME",
    "OUTPUT_ACTIVATION",
    "OUTPUT_NAME",
    "OutputHead",
    "Scorer",
    "bundle_scorer",
    "features_file_backend",
    "features_of_bundle",
    "features_of_file",
    "file_scorer",
    "run_features",
    "run_head",
    "score_file",
]

#: The exported graph's contract (``training.export.onnx_export``): one float32 input named ``input``, and
#: ``probabilities``, a softmax inside the graph, so the manifest's activation is ``none``.
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
OUTPUT_ACTIVATION = "none"
#: The exported graph's pooled stage-end activations (``training.model.models.FEATURES_NAME``).
FEATURES_NAME = "features"
#: Class names when a run's ``split.json`` records none (the first pipeline: Kermany).
DEFAULT_CLASSES = ("NORMAL", "PNEUMONIA")


@dataclass(frozen=True)
class OutputHead:
    """How to read a model's output: what the manifest's ``labels``/``positive_label``/``output`` say."""

    labels: tuple[str, ...]
    positive_label: str
    activation: str

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> OutputHead:
        return cls(tuple(bundle.labels), bundle.positive_label, bundle.output_activation)

    def positive(self, raw: np.ndarray) -> np.ndarray:
        """P(positive) per row of a backend's raw ``(N, K)`` output."""
        return positive_probabilities(
            raw, labels=self.labels, positive_label=self.positive_label, activation=self.activation
        )


def run_head(split: Mapping[str, Any] | None) -> OutputHead:
    """The head a run's models will have in their manifest, from the run's ``split.json``.

    The second class is the positive one (``split.json`` lists the negative
    class first); :func:`training.bundle.manifest.build_manifest` writes the same.
    """
    classes = tuple((split or {}).get("classes") or DEFAULT_CLASSES)
    return OutputHead(classes, classes[1], OUTPUT_ACTIVATION)


class Scorer:
    """A loaded backend and the head that reads its output; call it on preprocessed samples."""

    def __init__(self, backend: Backend, head: OutputHead) -> None:
        self.backend = backend
        self.head = head

    def __call__(self, samples: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """P(positive) of ``(N, ...)`` float32 samples in the spec's layout, ``batch_size`` at a time."""
        if len(samples) == 0:
            return np.empty(0, dtype=np.float64)
        return np.concatenate(
            [
                self.head.positive(self.backend.infer(np.ascontiguousarray(samples[i : i + batch_size])))
                for i in range(0, len(samples), batch_size)
            ]
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def bundle_scorer(bundle: ModelBundle, backend: str = "onnxruntime", threads: int = 2) -> Scorer:
    """Score the bundle's model for ``backend`` exactly as the service opens it (:func:`open_engine`)."""
    from edge_runtime.conformance import open_engine

    engine = open_engine(bundle, backend, threads=threads)
    return Scorer(engine, OutputHead.from_bundle(bundle))


def file_scorer(
    path: str | Path,
    spec: PreprocessSpec,
    head: OutputHead,
    threads: int = 2,
    *,
    input_name: str = INPUT_NAME,
    output_name: str | None = OUTPUT_NAME,
) -> Scorer:
    """Score an ONNX file that has no bundle (yet) with the edge's ONNX Runtime backend.

    Args:
        path: The ``.onnx`` file.
        spec: The preprocessing its samples come from (their shape is checked at load).
        head: How to read its output (:func:`run_head`, or a bundle's for its FP32 twin).
        threads: Intra-op threads.
        input_name: The input it must declare.
        output_name: Its first output's name, checked when given.
    """
    engine = OnnxRuntimeBackend(threads=threads)
    engine.load_model(path, input_name=input_name, sample_shape=spec.sample_shape, output_name=output_name)
    return Scorer(engine, head)


def score_file(
    path: str | Path, samples: np.ndarray, spec: PreprocessSpec, head: OutputHead, threads: int = 2
) -> np.ndarray:
    """P(positive) of ``samples`` under the ONNX file at ``path`` (load, score, close)."""
    with file_scorer(path, spec, head, threads) as scorer:
        return scorer(samples)


def run_features(
    backend: Backend, samples: np.ndarray, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """``(raw scores, features)`` of ``samples`` from a backend loaded with its features output."""
    scores: list[np.ndarray] = []
    features: list[np.ndarray] = []
    for i in range(0, len(samples), batch_size):
        out = backend.infer_outputs(np.ascontiguousarray(samples[i : i + batch_size]))
        if out.features is None:
            raise ValueError("the model was loaded without its features output")
        scores.append(out.scores)
        features.append(out.features)
    return np.concatenate(scores), np.concatenate(features)


def features_file_backend(
    path: str | Path, spec: PreprocessSpec, width: int | None = None, threads: int = 2
) -> OnnxRuntimeBackend:
    """The edge's ONNX Runtime backend on a file with a features output (checked: ``[batch, width]``)."""
    engine = OnnxRuntimeBackend(threads=threads)
    engine.load_model(
        path,
        input_name=INPUT_NAME,
        sample_shape=spec.sample_shape,
        output_name=OUTPUT_NAME,
        features_name=FEATURES_NAME,
        features_width=width,
    )
    return engine


def features_of_file(
    path: str | Path,
    samples: np.ndarray,
    spec: PreprocessSpec,
    width: int | None = None,
    threads: int = 2,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """``(raw scores (N, K), features (N, width))`` of an ONNX file with a features output.

    Through the edge's ONNX Runtime backend, as a box computes them (one run per batch).
    """
    engine = features_file_backend(path, spec, width, threads)
    try:
        return run_features(engine, samples, batch_size)
    finally:
        engine.close()


def features_of_bundle(
    bundle: ModelBundle,
    samples: np.ndarray,
    backend: str = "onnxruntime",
    threads: int = 2,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """``(raw scores, features)`` of a bundle's model for ``backend``, opened as the service opens it."""
    from edge_runtime.conformance import open_engine

    engine = open_engine(bundle, backend, threads=threads)
    try:
        return run_features(engine, samples, batch_size)
    finally:
        engine.close()
