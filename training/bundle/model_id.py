"""Stamp a model file with the id its manifest records, so the two cannot be mixed up.

The id is the sha256 of the ONNX file as exported (before the stamp), so it
names the trained weights and graph. ``training package`` writes it into the
model's own metadata (``metadata_props``, as ONNX Runtime's model-metadata
example does) and into the manifest's artifact entry; at load the edge
backend reads it back through ONNX Runtime and refuses a model file that
comes from another bundle, even when someone rewrote the file's hash in the
manifest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edge_runtime.manifest import ONNX_MODEL_ID_KEY

__all__ = ["stamp_onnx_model_id"]


def stamp_onnx_model_id(path: Path) -> str:
    """Write ``healthdiag.model_id`` into the ONNX file at ``path``; returns the id.

    Stamping an already stamped file keeps its id (repackaging does not change it).
    """
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p.value for p in model.metadata_props}
    model_id = existing.get(ONNX_MODEL_ID_KEY) or hashlib.sha256(path.read_bytes()).hexdigest()
    onnx.helper.set_model_props(model, {**existing, ONNX_MODEL_ID_KEY: model_id})
    onnx.save(model, str(path))
    return model_id
