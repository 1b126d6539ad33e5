"""Backend stage: model input batch -> raw model output.

Engines register by name with the class that wraps them and are imported
lazily, so a box without LiteRT still runs ONNX models.
"""

from __future__ import annotations

from ..backend_registry import _REGISTRY, AUTO_BACKEND, available_backends, register_backend
from ..errors import BackendError, EngineNotInstalled
from ..plugins import load_plugin
from .base import Backend, BackendOutput

__all__ = [
    "AUTO_BACKEND",
    "Backend",
    "BackendOutput",
    "available_backends",
    "create_backend",
    "register_backend",
]


def create_backend(name: str, *, threads: int = 1) -> Backend:
    """Instantiate the backend registered as ``name``.

    Raises:
        BackendError: ``name`` is not registered.
        EngineNotInstalled: its module cannot be imported (engines whose package is
            imported at :meth:`Backend.load` raise it there).
    """
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise BackendError(
            f"Unknown backend {name!r}; available: {', '.join(sorted(_REGISTRY))}.",
            action="Set Model.Backend to one of the available backends.",
        ) from None
    try:
        backend_class = load_plugin(target)
    except ImportError as exc:
        raise EngineNotInstalled(
            f"Backend {name!r} cannot be imported: {exc}.",
            action=f"Install the package that provides backend {name!r}, or set Model.Backend to "
            "another engine.",
        ) from exc
    backend: Backend = backend_class(threads=threads)
    return backend
