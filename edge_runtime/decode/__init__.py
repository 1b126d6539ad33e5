"""Decode stage: file on disk -> :class:`DecodedImage`.

Plugins are registered by name with the module that implements them, and
imported lazily, so a missing optional package only disables its plugin::

    register_decoder("dicom", "edge_runtime.decode.dicom:DicomDecoder")

:func:`decode_file` reads the first bytes once and tries, in order, every
available plugin that recognises the file. The first success wins. When all
of them fail, one error names each plugin's failure (as pydicom's pixel
decoders do), so an admin sees e.g. that pydicom needed a missing package
*and* the dcmtk fallback rejected the file, not just the last message.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from ..errors import CorruptImage, ImageTooLarge, IncompleteInput, InputError, NotAnImage
from .base import DecodedImage, DecodeLimits, Decoder

__all__ = [
    "DecodeLimits",
    "DecodedImage",
    "Decoder",
    "available_decoders",
    "decode_file",
    "register_decoder",
    "registered_decoders",
    "use_registry",
]

log = logging.getLogger(__name__)

_HEAD_BYTES = 512
_REGISTRY: dict[str, str] = {
    "dicom": "edge_runtime.decode.dicom:DicomDecoder",
    "raster": "edge_runtime.decode.raster:RasterDecoder",
}
_LOADED: dict[str, Decoder] = {}
_UNAVAILABLE: dict[str, str] = {}


def register_decoder(name: str, target: str, *, first: bool = False) -> None:
    """Register a decoder plugin ``module:Class``; ``first`` puts it ahead of the others."""
    global _REGISTRY
    if first:
        _REGISTRY = {name: target, **{k: v for k, v in _REGISTRY.items() if k != name}}
    else:
        _REGISTRY[name] = target
    _LOADED.pop(name, None)
    _UNAVAILABLE.pop(name, None)


def registered_decoders() -> dict[str, str]:
    """The registry in order (``name -> module:Class``), e.g. to hand to a child process."""
    return dict(_REGISTRY)


def use_registry(registry: dict[str, str]) -> None:
    """Replace the registry (a decoder child process mirrors its parent's)."""
    global _REGISTRY
    _REGISTRY = dict(registry)
    _LOADED.clear()
    _UNAVAILABLE.clear()


def available_decoders() -> list[Decoder]:
    """Instantiate registered plugins once; remember which ones cannot import and why."""
    decoders = []
    for name, target in _REGISTRY.items():
        if name in _UNAVAILABLE:
            continue
        if name not in _LOADED:
            module_name, _, class_name = target.partition(":")
            try:
                module = importlib.import_module(module_name)
                _LOADED[name] = getattr(module, class_name)()
            except ImportError as exc:
                _UNAVAILABLE[name] = str(exc)
                log.warning("decoder plugin %s unavailable: %s", name, exc)
                continue
        decoders.append(_LOADED[name])
    return decoders


def decode_file(
    path: str | Path,
    limits: DecodeLimits | None = None,
    *,
    data: bytes | None = None,
    name: str | None = None,
) -> DecodedImage:
    """Decode one file into a grey [0, 1] image plus metadata.

    Args:
        path: The file (read from disk only when ``data`` is None).
        limits: Guards applied before any pixel is decompressed.
        data: The file's content, already read (and checked against its admitted
            hash, :func:`~edge_runtime.files.read_verified`): decoders
            decode these bytes, never the path again. A plugin without
            ``decode_data`` still reads ``path``.
        name: What messages call the scan (its reference in the service); default
            the file's name.

    Raises:
        InputError: a subclass saying why this file cannot be used.
    """
    path = Path(path)
    label = Path(name) if name else path
    limits = limits or DecodeLimits()
    if data is not None:
        head = data[:_HEAD_BYTES]
    else:
        try:
            with open(path, "rb") as fh:
                head = fh.read(_HEAD_BYTES)
        except FileNotFoundError as exc:
            raise IncompleteInput(f"{label.name} disappeared before it could be read.") from exc
        except OSError as exc:
            raise IncompleteInput(f"{label.name} cannot be read: {exc.strerror}.") from exc
    if not head:
        raise CorruptImage(f"{label.name} is empty (0 bytes).")
    decoders = available_decoders()
    failures: list[tuple[Decoder, InputError]] = []
    for decoder in decoders:
        if not decoder.sniff(head, label):
            continue
        decode_data = getattr(decoder, "decode_data", None)
        try:
            if data is not None and decode_data is not None:
                decoded: DecodedImage = decode_data(data, label, limits)
                return decoded
            return decoder.decode(path, limits)
        except (ImageTooLarge, IncompleteInput):
            # A policy limit or a vanished file: another plugin would not do better.
            raise
        except InputError as exc:
            log.info("decoder %s failed on %s: %s", decoder.name, label.name, exc.message)
            failures.append((decoder, exc))
    if failures:
        raise _all_failed(label, failures)
    names = ", ".join(d.name for d in decoders)
    raise NotAnImage(
        f"{label.name} is neither DICOM (no 'DICM' marker at byte 128) nor a PNG/JPEG image "
        f"(decoders tried: {names})."
    )


def _all_failed(path: Path, failures: list[tuple[Decoder, InputError]]) -> InputError:
    """One error for every plugin that claimed ``path`` and failed.

    A single failure is returned unchanged. With several, the error keeps the
    class, code and advice of the first (preferred) plugin's failure, so
    quarantine records and their codes stay as they were, and its message
    lists every plugin's reason.
    """
    first = failures[0][1]
    if len(failures) == 1:
        return first
    reasons = "\n".join(f"  {decoder.name}: {exc.message}" for decoder, exc in failures)
    error = type(first)(f"Cannot decode {path.name}; every decoder that recognised it failed:\n{reasons}")
    error.action = first.action
    error.__cause__ = first
    return error
