"""Sample scans for a first run: real chest X-rays from the model bundle's reference set.

A new installation needs a scan to drop into the inbox, and a radiology IT
admin trying the box should not have to find one. Every bundle carries a few
de-identified training images (``conformance.npz``, credited in its model
card) with the answer the model gave on the build machine; this module writes
the clearest positive and the clearest negative of them as a DICOM and a PNG,
so a first run exercises both decoders and shows one finding of each kind.

Files are written as ``NAME.part`` and renamed when complete, as a sender
should (the inbox ignores ``.part`` files).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .bundle import ModelBundle
from .conformance import ood_for_backend
from .errors import InputError

__all__ = ["Sample", "write_chest_cr", "write_samples"]

#: DICOM CR Image Storage: the fewest mandatory attributes of the radiography SOP classes.
_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


@dataclass(frozen=True)
class Sample:
    """One file written, with what the bundle's build machine answered for its image."""

    path: Path
    label: str
    expected: float


def write_samples(bundle: ModelBundle, dest: Path) -> list[Sample]:
    """Write the reference set's clearest positive (DICOM) and clearest negative (PNG) to ``dest``.

    Clearest among the images within the model's intended use (its OOD check on the default
    backend): a sample outside it would get no answer, which is not what a first run should show.
    """
    spec = bundle.manifest.conformance
    if spec is None:
        raise InputError(
            f"model {bundle.manifest.name} {bundle.manifest.version} carries no reference images "
            "(no 'conformance' in its manifest), so it has no sample scans"
        )
    backend = bundle.backends[0]
    with np.load(bundle.path / spec.file) as refs:
        images, labels = refs["images"], refs["labels"]
        reference = refs["reference"]
        # What the bundle's first engine (the default) answered on the build machine.
        key = f"expected_{backend}"
        expected = refs[key] if key in refs.files else reference
        features = refs.get(f"features_expected_{backend}")
    # A sample must get an answer: only reference images within the model's intended use qualify.
    within = np.ones(len(images), dtype=bool)
    fitted = ood_for_backend(bundle, backend)
    if fitted is not None and features is not None:
        within = fitted[0].score(features) <= fitted[1]
    positive = bundle.manifest.labels.index(bundle.manifest.positive_label)
    pos = np.flatnonzero((labels == positive) & within)
    neg = np.flatnonzero((labels != positive) & within)
    if len(pos) == 0 or len(neg) == 0:
        raise InputError("the model's reference images do not hold both classes")
    clearest_pos = int(pos[np.argmax(reference[pos])])
    clearest_neg = int(neg[np.argmin(reference[neg])])
    negative_label = next(name for name in bundle.manifest.labels if name != bundle.manifest.positive_label)
    dest.mkdir(parents=True, exist_ok=True)
    return [
        Sample(
            write_chest_cr(images[clearest_pos], dest / f"sample-{bundle.manifest.positive_label}.dcm"),
            bundle.manifest.positive_label,
            float(expected[clearest_pos]),
        ),
        Sample(
            _write_png(images[clearest_neg], dest / f"sample-{negative_label}.png"),
            negative_label,
            float(expected[clearest_neg]),
        ),
    ]


def _publish(part: Path, final: Path) -> Path:
    os.replace(part, final)
    return final


def _write_png(grey: np.ndarray, path: Path) -> Path:
    part = path.with_name(path.name + ".part")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(grey, dtype=np.uint8))
    if not ok:  # pragma: no cover - OpenCV encodes any 8-bit grey array
        raise InputError(f"could not encode {path.name} as PNG")
    part.write_bytes(encoded.tobytes())
    return _publish(part, path)


def write_chest_cr(grey: np.ndarray, path: Path, *, patient_age: str = "003Y") -> Path:
    """A CR image of ``grey`` with a made-up patient: Modality CR, Body Part CHEST.

    ``patient_age``: Patient's Age (AS); the default is in the bundled model's population
    (children aged 1-5), another one makes the scan outside its intended use (benchmarks).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    pixels = np.ascontiguousarray(grey, dtype=np.uint8)
    now = dt.datetime.now(dt.UTC)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_CR_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid(prefix=None)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UID(_CR_IMAGE_STORAGE)
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(prefix=None)
    ds.SeriesInstanceUID = generate_uid(prefix=None)
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "SAMPLE"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = ""  # not recorded in the source data set (type 2: present, empty)
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientName = "SAMPLE^PAEDIATRIC"
    ds.PatientID = "HEALTHDIAG-SAMPLE"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientAge = patient_age
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "HealthDiag sample (model reference set)"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    # The whole 8-bit range as the display window (LINEAR: y = x / 255), so the image decodes to
    # exactly the grey levels the PNG sample and the reference set hold; without a window the
    # decoder would stretch the image's own min-max, which a reference image need not span.
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = pixels.tobytes()
    part = path.with_name(path.name + ".part")
    ds.save_as(part, enforce_file_format=True)
    return _publish(part, path)
