"""ONNX Runtime backend (the default)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..bundle import ModelBundle
from ..errors import BackendError, EngineNotInstalled, ModelBundleError
from ..manifest import ONNX_MODEL_ID_KEY
from .base import BackendOutput

__all__ = ["OnnxRuntimeBackend"]


class OnnxRuntimeBackend:
    """Runs the bundle's ``onnxruntime`` artifact on the CPU."""

    name = "onnxruntime"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._session = None
        self._input_name = ""
        self._outputs: list[str] = []
        self._heatmap_name: str | None = None
        self._features_name: str | None = None
        self._lock = threading.Lock()

    def load(self, bundle: ModelBundle) -> None:
        artifact = bundle.artifact(self.name)
        self.load_model(
            artifact.path,
            input_name=bundle.input_name,
            sample_shape=bundle.preprocessing.sample_shape,
            output_name=bundle.manifest.output.name,
            model_id=artifact.model_id,
            heatmap_name=bundle.manifest.heatmap_output(self.name),
            classes=len(bundle.labels),
            features_name=bundle.manifest.features_output(self.name),
            features_width=bundle.manifest.output.features.width if bundle.manifest.output.features else None,
        )

    def load_model(
        self,
        path: str | Path,
        *,
        input_name: str,
        sample_shape: Sequence[int] | None = None,
        output_name: str | None = None,
        model_id: str | None = None,
        heatmap_name: str | None = None,
        classes: int | None = None,
        features_name: str | None = None,
        features_width: int | None = None,
    ) -> None:
        """Load a model file that has no bundle yet, with the checks :meth:`load` makes.

        Training scores its FP32 and freshly quantized files before a manifest
        exists; going through here runs them with the same session options and
        input checks as the device, instead of a second ONNX Runtime set-up.

        Args:
            path: The ``.onnx`` file.
            input_name: The one input the model must declare (the manifest's ``input.name``).
            sample_shape: One sample's shape without the batch axis (the preprocessing's);
                checked when given.
            output_name: The first output's name, checked when given.
            model_id: The id the file's metadata must carry (the manifest's), checked when given.
            heatmap_name: The heat-map output the manifest names for this file (``[batch,
                classes, h, w]``), checked and returned by :meth:`infer_outputs`; None: not used.
            classes: The manifest's class count, checked against the heat-map's second axis.
            features_name: The pooled-features output the manifest names for this file
                (``[batch, width]``), checked and returned by :meth:`infer_outputs`; None: not used.
            features_width: Its width (the sum of ``output.features.dims``), checked when given.
        """
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
            raise EngineNotInstalled(
                f"ONNX Runtime (the onnxruntime package) cannot be imported here: {exc}.",
                action="Reinstall the runtime with its dependencies (pip install '.' in its source "
                "folder, or pip install onnxruntime).",
            ) from exc
        model_path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Spinning threads made 2 intra-op threads slower than 1 on a 2-core box.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelBundleError(
                f"ONNX Runtime cannot load {model_path}: {exc}",
                action="The model file is damaged or needs a newer ONNX Runtime; redeploy it.",
            ) from exc
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelBundleError(f"{model_path} has {len(inputs)} inputs; the runtime feeds exactly one.")
        declared = inputs[0]
        if declared.name != input_name:
            raise ModelBundleError(
                f"{model_path} names its input {declared.name!r}, but the manifest says {input_name!r}."
            )
        if declared.type != "tensor(float)":
            raise ModelBundleError(
                f"{model_path} expects input type {declared.type}; the runtime feeds float32."
            )
        model_shape = list(declared.shape)
        want = list(sample_shape) if sample_shape is not None else model_shape[1:]
        if len(model_shape) != 4 or [d for d in model_shape[1:]] != want:
            raise ModelBundleError(
                f"{model_path} expects input shape {model_shape}, but the manifest's "
                f"preprocessing produces {['batch', *want]}.",
                action="Repackage the bundle so its preprocessing matches the model.",
            )
        outputs = [o.name for o in session.get_outputs()]
        if output_name and output_name != outputs[0]:
            raise ModelBundleError(
                f"{model_path} names its first output {outputs[0]!r}, but the manifest says {output_name!r}.",
                action="Repackage the bundle so the manifest describes this model.",
            )
        if model_id is not None:
            carried = session.get_modelmeta().custom_metadata_map.get(ONNX_MODEL_ID_KEY)
            if carried != model_id:
                raise ModelBundleError(
                    f"{model_path} is not the model its manifest describes: the file carries model "
                    f"id {(carried or 'none')[:12]}…, the manifest {model_id[:12]}…. A model file "
                    "from another bundle was copied in.",
                    action="Redeploy the model component so model and manifest come from the same build.",
                )
        heatmap: str | None = None
        if heatmap_name is not None:
            shapes = {o.name: list(o.shape) for o in session.get_outputs()}
            shape = shapes.get(heatmap_name)
            if shape is None:
                raise ModelBundleError(
                    f"{model_path} has no output {heatmap_name!r}, the heat-map its manifest names "
                    f"(outputs: {', '.join(outputs)}).",
                    action="Repackage the bundle so the manifest describes this model.",
                )
            if len(shape) != 4 or (classes is not None and shape[1] != classes):
                raise ModelBundleError(
                    f"{model_path} output {heatmap_name!r} has shape {shape}; a heat-map is "
                    f"[batch, {classes if classes is not None else 'classes'}, h, w].",
                    action="Repackage the bundle so the manifest describes this model.",
                )
            heatmap = heatmap_name
        if features_name is not None:
            shape = {o.name: list(o.shape) for o in session.get_outputs()}.get(features_name)
            if shape is None:
                raise ModelBundleError(
                    f"{model_path} has no output {features_name!r}, the features output its manifest "
                    f"names (outputs: {', '.join(outputs)}).",
                    action="Repackage the bundle so the manifest describes this model.",
                )
            if len(shape) != 2 or (features_width is not None and shape[1] != features_width):
                raise ModelBundleError(
                    f"{model_path} output {features_name!r} has shape {shape}; the manifest's features "
                    f"output is [batch, {features_width if features_width is not None else 'width'}].",
                    action="Repackage the bundle so the manifest describes this model.",
                )
        self._session = session
        self._input_name = declared.name
        self._outputs = [
            outputs[0],
            *([heatmap] if heatmap else []),
            *([features_name] if features_name else []),
        ]
        self._heatmap_name = heatmap
        self._features_name = features_name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_outputs(batch).scores

    def infer_outputs(self, batch: np.ndarray) -> BackendOutput:
        """One session run: the first output and the heat-map and features the manifest names."""
        if self._session is None:
            raise BackendError("infer() called before load().")
        if batch.dtype != np.float32:
            raise BackendError(f"Backend input must be float32, got {batch.dtype}.")
        try:
            outputs = self._session.run(self._outputs, {self._input_name: batch})
        except Exception as exc:
            raise BackendError(f"ONNX Runtime inference failed: {exc}") from exc
        scores = np.asarray(outputs[0], dtype=np.float32)
        heatmap = np.asarray(outputs[1], dtype=np.float32) if self._heatmap_name is not None else None
        features = np.asarray(outputs[-1], dtype=np.float32) if self._features_name is not None else None
        return BackendOutput(scores, heatmap, features)

    def close(self) -> None:
        self._session = None
