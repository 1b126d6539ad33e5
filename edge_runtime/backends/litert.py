"""LiteRT (TensorFlow Lite) backend.

Imports ``ai_edge_litert`` and falls back to ``tflite_runtime`` (older
boxes). Integer-quantized inputs and outputs are (de)quantized here with the
model's own scale and zero point, and an NCHW batch is transposed when the
model wants NHWC, so bundles can share one preprocessing spec. A heat-map
output (converters name outputs by position, so it is the one rank-4 output)
comes back in the spec's NCHW order, ``[N, K, h, w]``, like ONNX Runtime's. The scores and
the pooled features (``output.features``) are both rank 2; they are told apart by width: the
scores have one column per label, the features the manifest's ``sum(dims)``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..bundle import ModelBundle
from ..errors import BackendError, EngineNotInstalled, ModelBundleError
from .base import BackendOutput

__all__ = ["LiteRtBackend", "load_interpreter_class"]


def load_interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except (ImportError, SystemError) as exc:
            raise EngineNotInstalled(
                "LiteRT is not installed here (neither ai-edge-litert nor tflite-runtime can be "
                "imported); it is an optional extra of the runtime.",
                # A plain ``pip install .`` leaves the ``litert`` extra out.
                action="Install it with pip install '.[litert]' in the runtime's source folder (or "
                "pip install ai-edge-litert), or set Model.Backend to onnxruntime.",
            ) from exc
    return Interpreter


class LiteRtBackend:
    """Runs the bundle's ``litert`` artifact."""

    name = "litert"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._interpreter: Any = None
        self._input: dict[str, Any] = {}
        self._output: dict[str, Any] = {}
        self._heatmap: dict[str, Any] | None = None
        self._wants_heatmap = False
        self._features: dict[str, Any] | None = None
        self._classes: int | None = None
        self._features_width: int | None = None
        self._transpose = False
        self._batch = 0
        self._dynamic_batch = False
        self._lock = threading.Lock()

    def load(self, bundle: ModelBundle) -> None:
        interpreter_cls = load_interpreter_class()
        artifact = bundle.artifact(self.name)
        try:
            interpreter = interpreter_cls(model_path=str(artifact.path), num_threads=self.threads)
            interpreter.allocate_tensors()
        except Exception as exc:
            raise ModelBundleError(f"LiteRT cannot load {artifact.path}: {exc}") from exc
        inputs = interpreter.get_input_details()
        if len(inputs) != 1:
            raise ModelBundleError(
                f"{artifact.path} has {len(inputs)} inputs; the runtime feeds exactly one."
            )
        shape = [int(d) for d in inputs[0]["shape"]]
        spec = bundle.preprocessing
        nhwc = [spec.height, spec.width, spec.channels]
        nchw = [spec.channels, spec.height, spec.width]
        if shape[1:] == list(spec.sample_shape):
            self._transpose = False
        elif spec.layout == "NCHW" and shape[1:] == nhwc:
            self._transpose = True
        else:
            raise ModelBundleError(
                f"{artifact.path} expects input shape {shape}, but the manifest's preprocessing "
                f"produces {['batch', *(nchw if spec.layout == 'NCHW' else nhwc)]}."
            )
        self._interpreter = interpreter
        self._input = inputs[0]
        self._wants_heatmap = bundle.manifest.heatmap_output(self.name) is not None
        self._classes = len(bundle.labels)
        spec_features = bundle.manifest.output.features
        wants_features = bundle.manifest.features_output(self.name) is not None
        self._features_width = spec_features.width if wants_features and spec_features is not None else None
        self._pick_outputs(str(artifact.path))
        self._batch = shape[0]
        signature = inputs[0].get("shape_signature", inputs[0]["shape"])
        self._dynamic_batch = int(signature[0]) == -1

    def _pick_outputs(self, source: str) -> None:
        """The scores (rank 2, one column per label), the heat-map (rank 4) and the features
        (rank 2, the manifest's width) where the manifest names them."""
        details = self._interpreter.get_output_details()
        pairs = [d for d in details if len(d["shape"]) == 2]
        maps = [d for d in details if len(d["shape"]) == 4]
        width = self._features_width
        scores = [d for d in pairs if self._classes is None or int(d["shape"][1]) == self._classes]
        if width is None and not scores:
            scores = pairs  # a model whose scores width the manifest does not fix (checked later)
        self._output = scores[0] if scores else details[0]
        self._heatmap = None
        self._features = None
        if self._wants_heatmap:
            if len(maps) != 1:
                raise ModelBundleError(
                    f"{source} has {len(maps)} rank-4 outputs; its manifest says it computes a "
                    "heat-map, which is exactly one [batch, h, w, classes] or [batch, classes, h, w] output.",
                    action="Repackage the bundle so the manifest describes this model.",
                )
            self._heatmap = maps[0]
        if width is not None:
            features = [d for d in pairs if d is not self._output and int(d["shape"][1]) == width]
            if not scores or len(features) != 1:
                found = ", ".join(str([int(x) for x in d["shape"]]) for d in details)
                raise ModelBundleError(
                    f"{source} does not have the outputs its manifest names: a [batch, {self._classes}] "
                    f"scores output and one [batch, {width}] features output (its outputs: {found}).",
                    action="Repackage the bundle so the manifest describes this model (the LiteRT file "
                    "and the manifest must come from the same build).",
                )
            self._features = features[0]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_outputs(batch).scores

    def infer_outputs(self, batch: np.ndarray) -> BackendOutput:
        """One interpreter run per sample (or per batch): the scores, heat-map and features if any."""
        if self._interpreter is None:
            raise BackendError("infer() called before load().")
        if self._transpose:
            batch = np.ascontiguousarray(batch.transpose(0, 2, 3, 1))
        with self._lock:  # a LiteRT interpreter is not re-entrant
            if self._dynamic_batch:
                runs = [self._run(batch)]
            else:
                # Fixed-batch models (most converted ones) run one sample at a time.
                runs = [self._run(batch[i : i + 1]) for i in range(batch.shape[0])]
        scores = np.concatenate([r[0] for r in runs])
        heatmap = (
            np.concatenate([r[1] for r in runs if r[1] is not None]) if self._heatmap is not None else None
        )
        features = (
            np.concatenate([r[2] for r in runs if r[2] is not None]) if self._features is not None else None
        )
        return BackendOutput(scores, heatmap, features)

    def _read(self, detail: dict[str, Any]) -> np.ndarray:
        out = self._interpreter.get_tensor(detail["index"]).copy()
        if np.issubdtype(out.dtype, np.integer):
            scale, zero = detail["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return np.asarray(out, dtype=np.float32)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if batch.shape[0] != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], list(batch.shape))
            self._interpreter.allocate_tensors()
            self._input = self._interpreter.get_input_details()[0]
            self._pick_outputs("the LiteRT model")
            self._batch = batch.shape[0]
        dtype = self._input["dtype"]
        if np.issubdtype(dtype, np.integer):
            scale, zero = self._input["quantization"]
            info = np.iinfo(dtype)
            batch = np.clip(np.rint(batch / scale + zero), info.min, info.max).astype(dtype)
        try:
            self._interpreter.set_tensor(self._input["index"], batch)
            self._interpreter.invoke()
            out = self._read(self._output)
            heat = self._read(self._heatmap) if self._heatmap is not None else None
            pooled = self._read(self._features) if self._features is not None else None
        except Exception as exc:
            raise BackendError(f"LiteRT inference failed: {exc}") from exc
        rows: np.ndarray = out.reshape(out.shape[0], -1)
        if heat is not None and self._transpose:
            heat = np.ascontiguousarray(heat.transpose(0, 3, 1, 2))  # NHWC model: back to N, K, h, w
        return rows, heat, pooled

    def close(self) -> None:
        self._interpreter = None
