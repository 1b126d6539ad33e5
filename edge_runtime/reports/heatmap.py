"""The heat-map a reader can see: the model's class-activation map on the image, as PNG and DICOM.

The model computes the map itself, in the same run as the probability (the
bundle's ``output.heatmap``, see :mod:`edge_runtime.backends.base`): the
classifier's weights applied at each cell of the last convolutional
features, a coarse grid (3x3 for the 96 px bundled model). Here it is turned
into pixels a radiologist can look at:

* :func:`positive_heat` -- the positive class's evidence, scaled to [0, 1] as
  drawn (:func:`edge_runtime.heat.normalised_heat`, the same scaling the
  conformance check compares, so what is checked is what is shown);
* :func:`overlay` -- upsampled onto the image (which the model saw whole,
  stretched to its input, so the grid covers the whole image) and blended in
  a colour map scaled to the finding (:func:`heat_scale`), with "NOT FOR
  DIAGNOSTIC USE" and the decision (:func:`decision_text`) burned in;
* :func:`png_bytes` -- a PNG for the result's link;
* :func:`secondary_capture` -- a DICOM Secondary Capture (highdicom) in the
  source's patient and study, with UIDs derived from the result's
  ``message_id`` (:func:`~edge_runtime.reports.uids.derived_uid`), so a
  redelivered result produces the same object and a PACS keeps it once.

Nothing here writes files (``reports.writer`` does) and nothing here
imports torch. The map says where the evidence for the positive class is
strongest *relative to the rest of this image*; it does not say that the
finding is present (the probability does) and it is not a segmentation.

**The rule: red means a finding.** The grid is relative (its hottest cell is
1 on every scan), so drawn as it is, a clearly negative scan would paint its
strongest cell full red. The drawn heat is therefore the grid times
:func:`heat_scale`:

* a **positive** scan (P >= threshold) is drawn at full scale: its hottest
  cell red, blended at weight 0.5;
* a **negative** scan is drawn at ``0.5 * P / threshold`` of the scale: its
  hottest cell at most green (the middle of the JET scale), blended at
  weight at most 0.25, and fainter (dark blue, nearly transparent) the lower
  P is; yellow and red appear only on positive scans. E.g. P = 0.23 with
  threshold 0.93: hottest cell at 0.12 of the scale, dark blue at weight 0.06.

The top-left band carries "NOT FOR DIAGNOSTIC USE" and the decision, e.g.
``P(PNEUMONIA) 0.23 < 0.93: no finding`` or ``P(PNEUMONIA) 0.97 >= 0.93:
PNEUMONIA`` (the model's label and numbers only, never patient data; as many
decimals as it takes, from 2, for the comparison to read right).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ..results import positive_index
from .preview import fit_image
from .uids import derived_uid

if TYPE_CHECKING:
    import pydicom

__all__ = [
    "CAUTION",
    "NEGATIVE_CEILING",
    "decision_text",
    "fit_image",
    "heat_scale",
    "overlay",
    "png_bytes",
    "positive_heat",
    "secondary_capture",
]

#: Burned into every overlay (and so the Secondary Capture says BurnedInAnnotation YES).
CAUTION = "NOT FOR DIAGNOSTIC USE"
#: Largest blend weight of the colour map: the hottest cell still shows the anatomy under it.
_MAX_ALPHA = 0.5
#: The most of the colour scale a negative scan's map reaches (JET's middle: green, never red).
NEGATIVE_CEILING = 0.5


def heat_scale(finding: Mapping[str, Any]) -> float:
    """How much of the colour scale a scan's map may use: 1 if positive, else ``0.5 * P / threshold``.

    ``finding`` is the result's ``findings[0]`` (``probability``, ``threshold``,
    ``positive``). See the module docstring for the rule.
    """
    if finding["positive"]:
        return 1.0
    probability, threshold = float(finding["probability"]), float(finding["threshold"])
    if threshold <= 0.0:
        return NEGATIVE_CEILING
    return NEGATIVE_CEILING * min(1.0, max(0.0, probability / threshold))


def decision_text(finding: Mapping[str, Any]) -> str:
    """``P(LABEL) 0.23 < 0.93: no finding`` or ``P(LABEL) 0.97 >= 0.93: LABEL`` (ASCII, for the image).

    Two decimals, or more where two would make the comparison read wrong
    (0.925 against 0.93 is written ``0.925 < 0.930``).
    """
    label = str(finding["label"]).encode("ascii", "replace").decode("ascii")
    probability, threshold = float(finding["probability"]), float(finding["threshold"])
    positive = bool(finding["positive"])
    for digits in range(2, 7):
        p_text, t_text = f"{probability:.{digits}f}", f"{threshold:.{digits}f}"
        if (float(p_text) >= float(t_text)) == positive:
            break
    if positive:
        return f"P({label}) {p_text} >= {t_text}: {label}"
    return f"P({label}) {p_text} < {t_text}: no finding"


def positive_heat(cam: np.ndarray, labels: list[str], positive_label: str) -> np.ndarray:
    """One scan's ``(K, h, w)`` class-activation map -> ``(h, w)`` float32 in [0, 1].

    The positive class's logit map minus the others' mean, minus its minimum,
    divided by its range (never less than one logit, so a flat map stays dark
    instead of stretching rounding noise to full colour).
    """
    # Imported here, not at the top: the report child draws maps but never computes them, and
    # this import would load the backends into it (ONNX Runtime, ~16 MB of its memory).
    from ..heat import normalised_heat

    maps = np.asarray(cam)
    if maps.ndim != 3 or maps.shape[0] != len(labels):
        raise ValueError(f"a class-activation map is (classes={len(labels)}, h, w), got {maps.shape}")
    return normalised_heat(maps, positive_index(labels, positive_label))


_JET_RGB: np.ndarray | None = None


def _jet_rgb() -> np.ndarray:
    """OpenCV's JET colour map as a ``(3, 256)`` float32 table, one row per RGB channel."""
    global _JET_RGB
    if _JET_RGB is None:
        bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(-1, 1), cv2.COLORMAP_JET)
        _JET_RGB = np.ascontiguousarray(bgr.reshape(256, 3)[:, ::-1].T, dtype=np.float32)
    return _JET_RGB


def overlay(
    image: np.ndarray,
    heat: np.ndarray,
    max_side: int = 1024,
    *,
    finding: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """The heat-map over the image: ``(rows, cols, 3)`` RGB uint8, longer side <= ``max_side``.

    ``image`` is the decoded scan (2-D float, [0, 1], 1 = bright); ``heat`` the
    :func:`positive_heat` grid. The grid is upsampled with bicubic
    interpolation over the whole image (the model saw it stretched to its
    square input), coloured with the JET map and blended with a weight
    proportional to the heat, so cold regions show the plain radiograph.

    With ``finding`` (the result's ``findings[0]``; the reports always pass
    it) the heat is scaled by :func:`heat_scale` (a negative scan's map is
    muted, never red) and :func:`decision_text` is written under the caution.
    Without it the grid is drawn as it is, with the caution only.
    """
    grey = fit_image(image, max_side)
    rows, cols = grey.shape
    grid = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    if grid.ndim != 2:
        raise ValueError(f"heat must be a 2-D grid, got shape {grid.shape}")
    up = np.asarray(cv2.resize(grid, (cols, rows), interpolation=cv2.INTER_CUBIC), dtype=np.float32)
    np.clip(up, 0.0, 1.0, out=up)
    scale = 1.0 if finding is None else heat_scale(finding)
    if scale < 1.0:
        np.multiply(up, np.float32(scale), out=up)
    # rgb = rint(grey*255 * (1 - alpha) + jet(rint(up*255)) * alpha), alpha = MAX_ALPHA*up, all in
    # float32, computed a channel at a time in place: the same operations in the same order as a
    # whole-image expression (so the same pixels), without its full-size temporaries.
    scaled = np.multiply(up, np.float32(255.0))
    np.rint(scaled, out=scaled)
    index = scaled.astype(np.uint8)
    alpha = np.multiply(up, np.float32(_MAX_ALPHA))
    base = np.multiply(grey, np.float32(255.0))
    np.multiply(base, np.subtract(np.float32(1.0), alpha), out=base)
    rgb = np.empty((rows, cols, 3), dtype=np.uint8)
    plane = scaled  # reused as the per-channel buffer
    for channel, table in enumerate(_jet_rgb()):
        np.take(table, index, out=plane)
        np.multiply(plane, alpha, out=plane)
        np.add(base, plane, out=plane)
        np.rint(plane, out=plane)
        np.clip(plane, 0.0, 255.0, out=plane)
        rgb[..., channel] = plane
    _caption(rgb, [CAUTION] if finding is None else [CAUTION, decision_text(finding)])
    return rgb


def _caption(rgb: np.ndarray, lines: list[str]) -> None:
    """Burn ``lines`` into the top-left corner, white on one dark band, scaled to the image."""
    rows, cols = rgb.shape[:2]
    scale = max(0.3, min(cols, rows) / 700.0)
    thickness = max(1, round(scale * 1.5))
    sizes = [cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness) for line in lines]
    width = max(w for (w, _), _ in sizes)
    height = max(h for (_, h), _ in sizes)
    base = max(b for _, b in sizes)
    pad = max(2, height // 3)
    step = height + base + pad  # one line's height, baseline to baseline
    bottom = height + base + 2 * pad + step * (len(lines) - 1)
    cv2.rectangle(rgb, (0, 0), (min(cols - 1, width + 2 * pad), min(rows - 1, bottom)), (0, 0, 0), -1)
    for number, line in enumerate(lines):
        cv2.putText(
            rgb,
            line,
            (pad, pad + height + number * step),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            thickness,
            cv2.LINE_AA,
        )


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG of an RGB uint8 image (lossless, so the file is the overlay that was computed)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"png_bytes needs (rows, cols, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("OpenCV could not encode the overlay as PNG")
    return encoded.tobytes()


def _orientation(source: pydicom.Dataset) -> tuple[str, str]:
    """The source's Patient Orientation, else the display convention of a frontal chest film.

    A PA or AP chest radiograph is read with the patient's right on the
    viewer's left and the head up: rows run to the patient's left (``L``),
    columns to the feet (``F``). The overlay keeps the source's geometry.
    """
    value = source.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v) for v in value):
        return str(value[0]), str(value[1])
    return "L", "F"


def _sc_image(hd: Any, source: pydicom.Dataset, rgb: np.ndarray, uid_root: str, message_id: str) -> Any:
    """highdicom's SC image in the source's patient and study, with the derived UIDs."""
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derived_uid(uid_root, message_id, "heatmap-series"),
        series_number=9901,
        sop_instance_uid=derived_uid(uid_root, message_id, "heatmap-instance"),
        instance_number=1,
        manufacturer="HealthDiag",
        patient_orientation=_orientation(source),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def secondary_capture(
    source: pydicom.Dataset,
    rgb: np.ndarray,
    *,
    uid_root: str,
    message_id: str,
    model: dict[str, str],
) -> pydicom.Dataset:
    """The overlay as a DICOM Secondary Capture in the source's patient and study.

    Patient and study attributes are copied from ``source`` (the scan's
    header; it stays inside the hospital, like the scan). Series and SOP
    Instance UIDs derive from ``message_id`` (roles ``heatmap-series`` and
    ``heatmap-instance``); the model's name, version and sha256 are in the
    series description, the derivation description and the software
    versions, and the source image is referenced (Source Image Sequence).
    Header values invalid for their VR are normalised or left out first
    (:func:`.header.clean_header`).

    Raises:
        ReportSourceError: the source's Study Instance UID is missing or not a DICOM UID.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    from ..errors import ReportSourceError
    from .header import clean_header, is_valid_uid

    source, _fixes = clean_header(source)
    if not is_valid_uid(str(source.get("StudyInstanceUID") or "")):
        raise ReportSourceError(
            "cannot write the heat-map Secondary Capture: the scan's header has no valid StudyInstanceUID"
        )

    name, version = model.get("name", "model"), model.get("version", "")
    sha = model.get("sha256", "")
    with warnings.catch_warnings():
        # highdicom warns about person names with one component; hospitals' headers hold them
        # (and pseudonymised ones), and they are copied as they are, not composed here.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        sc = _sc_image(hd, source, rgb, uid_root, message_id)
    sc.SeriesDescription = f"AI heat-map {name} {version} - {CAUTION}"[:64]
    sc.ManufacturerModelName = name[:64]
    sc.SoftwareVersions = "\\".join(v[:64] for v in (version, f"sha256:{sha[:56]}") if v)
    sc.BurnedInAnnotation = "YES"
    # Type 2C in General Series (paired body parts); a chest is not paired, so usually empty.
    sc.Laterality = str(source.get("Laterality", "") or "")
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (
        f"Class-activation map of model {name} {version} (sha256 {sha}) over the source image. {CAUTION}."
    )[:1024]
    sc.ImageComments = (
        f"{CAUTION}. Where the model's evidence for its finding is strongest in this image; "
        "drawn at full strength only when the finding is present."
    )
    if is_valid_uid(str(source.get("SOPInstanceUID") or "")) and is_valid_uid(
        str(source.get("SOPClassUID") or "")
    ):
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([reference])
    dataset: pydicom.Dataset = sc
    return dataset
