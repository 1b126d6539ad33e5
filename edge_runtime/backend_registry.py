"""Which inference engines exist, by the name ``Model.Backend`` takes: a leaf, importing nothing.

The configuration checks ``Model.Backend`` against it when it is read; :mod:`.backends`
creates the engine a name stands for. Keeping the names here, apart from the engines,
means reading a setting never imports the model stack (bundle, signing, numpy).
"""

from __future__ import annotations

__all__ = ["AUTO_BACKEND", "available_backends", "register_backend"]

#: ``Model.Backend`` value that lets the runtime pick the fastest conforming engine
#: (:mod:`edge_runtime.backend_choice`); not an engine itself.
AUTO_BACKEND = "auto"

#: name -> ``module:Class`` of its :class:`~edge_runtime.backends.base.Backend`.
_REGISTRY: dict[str, str] = {
    "onnxruntime": "edge_runtime.backends.onnx:OnnxRuntimeBackend",
    "litert": "edge_runtime.backends.litert:LiteRtBackend",
}


def register_backend(name: str, target: str) -> None:
    """Register ``module:Class`` under ``name``."""
    _REGISTRY[name] = target


def available_backends() -> list[str]:
    """Names that ``Model.Backend`` may take (registered, not necessarily installed)."""
    return sorted(_REGISTRY)
