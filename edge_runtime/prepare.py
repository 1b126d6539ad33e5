"""Decode + preprocess in one step: a file becomes a :class:`PreparedScan`, never a full-size image.

A 1955x1841 chest CR decodes to 14 MB of float32 pixels, but the rest of the
pipeline needs very little of it: the model's input sample (96x96x3 for the
bundled model), the hash of the decoded pixels (``message_id`` of a DICOM
scan), and, for the heat-map, the image shrunk to ``Reports.HeatmapMaxSide``.
:func:`prepare_file` computes exactly those, where the pixels are decoded.

In the service that is the decoder child (:mod:`edge_runtime.sandbox`), so

* the 14 MB image never crosses the pipe to the service (about 0.2 MB does),
* preprocessing and hashing run in the decoder processes, on every core,
  instead of in the service's workers, behind one GIL,
* the service never holds a full-size image: its memory no longer grows with
  the size of the scans in flight.

The functions called are the same as before, on the same pixels (:func:`~edge_runtime.decode.decode_file`,
:func:`~edge_runtime.preprocess.preprocess`,
:func:`~edge_runtime.results.pixels_digest`,
:func:`~edge_runtime.reports.preview.fit_image`; none writes to them, so the
hash runs beside the others): the sample, the digest and the preview are
bit-identical to those of the in-process path, which ``edge-runtime process``
still takes.

A preprocessing failure is carried back, not raised: the intake policy is
checked first (in the service), as it was when preprocessing ran there, so a
scan the model is not meant for is refused as such, whatever its pixels.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decode import DecodeLimits, decode_file
from .errors import EdgeRuntimeError, UnsupportedImage
from .files import ScanFile, read_verified
from .preprocess import PreprocessSpec, preprocess
from .reports.preview import fit_image
from .results import pixels_digest

__all__ = ["PrepareOptions", "PreparedScan", "prepare_file"]


@dataclass(frozen=True)
class PrepareOptions:
    """What to compute besides the decode (small and picklable: sent with each file)."""

    spec: PreprocessSpec
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    #: Longer side of the heat-map preview; 0 = no preview (no heat-map output, or heat-maps off).
    preview_side: int = 0


@dataclass
class PreparedScan:
    """One decoded and preprocessed scan, without its full-size pixels.

    Attributes:
        kind: ``dicom`` or ``image``.
        decoder: The plugin that decoded it.
        metadata: The decoder's metadata (no patient identifiers, see DecodedImage).
        shape: ``(rows, columns)`` of the decoded image.
        sample: The model input, ``spec.sample_shape`` float32; None when
            preprocessing failed (``preprocess_error`` says why).
        preprocess_error: ``(message, action)`` of the UnsupportedImage to raise
            once the intake policy has passed the scan.
        pixels_sha256: :func:`~edge_runtime.results.pixels_digest` of the decoded
            image, for scans with a SOP Instance UID (else None).
        preview: The image as the heat-map overlay draws on it
            (:func:`~edge_runtime.reports.preview.fit_image`), or None.
        timings_ms: ``decode``, ``preprocess`` and ``digest`` as measured where they ran
            (the digest runs beside preprocessing).
        header: The decoder's :attr:`~edge_runtime.decode.base.DecodedImage.header`: the
            DICOM header bytes the reports are built from (a few KB), or None.
    """

    kind: str
    decoder: str
    metadata: dict[str, Any]
    shape: tuple[int, ...]
    sample: np.ndarray | None
    preprocess_error: tuple[str, str | None] | None
    pixels_sha256: str | None
    preview: np.ndarray | None
    timings_ms: dict[str, float]
    header: bytes | None = field(default=None, repr=False)

    def sample_or_raise(self) -> np.ndarray:
        """The model input, or the UnsupportedImage preprocessing ended with."""
        if self.sample is None:
            message, action = self.preprocess_error or ("The image could not be preprocessed.", None)
            raise UnsupportedImage(message, action=action)
        return self.sample


def prepare_file(
    path: Path, options: PrepareOptions, *, scan: ScanFile | None = None, name: str | None = None
) -> PreparedScan:
    """Decode ``path`` and compute what the pipeline needs from its pixels.

    Args:
        path: The scan file.
        options: What to compute besides the decode.
        scan: What the service hashed and admitted. Given, the file is read once
            more through a no-follow descriptor, the bytes are checked against
            ``scan.sha256`` and exactly those bytes are decoded
            (:func:`~edge_runtime.files.read_verified`): a file swapped or
            rewritten after its hash is never decoded under the admitted identity.
        name: What messages call the scan (its keyed reference in the service), so
            nothing said here or in a decoder names the file; default its name.

    Raises:
        InputError: the file cannot be decoded (as :func:`~edge_runtime.decode.decode_file`).
        InputChanged: ``scan`` given, and the file is no longer what was admitted.
    """
    label = name or path.name
    t0 = time.perf_counter()
    if scan is None:
        decoded = decode_file(path, options.limits, name=label)
    else:
        decoded = decode_file(path, options.limits, data=read_verified(scan, label), name=label)
    t1 = time.perf_counter()
    pixels = decoded.pixels
    wants_digest = bool(decoded.metadata.get("sop_instance_uid"))
    # The pixel hash (8 ms for a 1955x1841 CR) runs beside preprocessing and the preview:
    # hashlib and OpenCV release the GIL, so on two cores the scan is ready that much sooner.
    hasher = ThreadPoolExecutor(1, thread_name_prefix="pixels-digest") if wants_digest else None
    digest: Future[tuple[str, float]] | None = None
    try:
        if hasher is not None:
            try:
                digest = hasher.submit(_timed_digest, pixels)
            except RuntimeError:  # no thread to be had (the child's memory cap): hash inline below
                digest = None
        sample: np.ndarray | None = None
        error: tuple[str, str | None] | None = None
        try:
            sample = preprocess(pixels, options.spec)
        except MemoryError:
            raise  # the decoder child's memory cap, not the file's fault: the sandbox says so
        except EdgeRuntimeError as exc:
            error = (exc.message, exc.action)
        except Exception as exc:
            error = (
                f"{label} cannot be preprocessed: {exc} (decoded shape {pixels.shape}, "
                f"dtype {pixels.dtype}{_value_range(pixels)}).",
                None,
            )
        t2 = time.perf_counter()
        preview = _preview(pixels, options.preview_side) if sample is not None else None
        if digest is not None:
            pixels_sha256, digest_ms = digest.result()
        elif wants_digest:
            pixels_sha256, digest_ms = _timed_digest(pixels)
        else:
            pixels_sha256, digest_ms = None, 0.0
    finally:
        if hasher is not None:
            hasher.shutdown(wait=True)
    return PreparedScan(
        kind=decoded.kind,
        decoder=decoded.decoder,
        metadata=decoded.metadata,
        shape=tuple(pixels.shape),
        sample=sample,
        preprocess_error=error,
        pixels_sha256=pixels_sha256,
        preview=preview,
        header=decoded.header,
        timings_ms={
            "decode": (t1 - t0) * 1000,
            "preprocess": (t2 - t1) * 1000,
            "digest": digest_ms,
        },
    )


def _preview(pixels: np.ndarray, side: int) -> np.ndarray | None:
    """The heat-map preview, or None: a preview that cannot be made costs the heat-map, not the scan."""
    if side <= 0:
        return None
    try:
        return fit_image(pixels, side)
    except MemoryError:
        raise
    except Exception:
        return None


def _timed_digest(pixels: np.ndarray) -> tuple[str, float]:
    t0 = time.perf_counter()
    digest = pixels_digest(pixels)
    return digest, (time.perf_counter() - t0) * 1000


def _value_range(pixels: np.ndarray) -> str:
    """``, range [lo, hi]`` for a diagnostic message ('' when the array has no values to show)."""
    try:
        return f", range [{float(np.min(pixels)):.3g}, {float(np.max(pixels)):.3g}]"
    except (ValueError, TypeError):
        return ""
