"""One result as a DICOM Structured Report: TID 1500 Measurement Report, IHE AI Results style.

PACS viewers and reporting systems read DICOM SR, not MQTT JSON. :func:`build_sr`
writes one Comprehensive 3D SR per result (highdicom), laid out as the IHE
Radiology "AI Results" (AIR) profile lays out an AI finding on top of DICOM
TID 1500:

* **observation context** (TID 1001/1004): the model is a *device observer*
  (name, version, manufacturer HealthDiag); its UID is derived from the model
  artifact's sha256, so every report of one model names the same device;
* **procedure reported**: (399208008, SCT, "Plain chest X-ray");
* **image library** (TID 1600): the source radiograph and, when given, the
  heat-map Secondary Capture;
* one **measurement group** (TID 1501) per finding, holding
  - the tracking identifier (deterministic UID) and the finding site
    (39607008, SCT, "Lung structure");
  - the **algorithm identification** (TID 4019): model name, version,
    manufacturer, and as *Algorithm Parameters* ``sha256=<artifact hash>``,
    ``backend=``, ``quantization=``, ``preprocessing_sha256=``, so the exact
    model file that produced the report is named in the report;
  - two **numeric measurements** (TID 300), unit (1, UCUM, "no units"):
    (122157, DCM, "Probability") = P(finding) and (122411, DCM, "Threshold Value")
    = the operating point it was compared with;
  - the **qualitative evaluation** that says what was decided: concept = the
    finding (e.g. (233604007, SCT, "Pneumonia")), value = (52101004, SCT,
    "Present") or (272519000, SCT, "Absent") (CID 240 "Present-Absent") at the
    operating point. It carries an Observation UID, which the FHIR mapping
    uses as the Observation's identifier;
  - a second qualitative evaluation for **triage**: (260870009, SCT, "Priority")
    = (103391001, SCT, "Urgent") when the result's priority is urgent,
    else (50811001, SCT, "Routine"). SNOMED's priority attribute and values
    are the ones order priorities use, and a worklist needs both states, not
    the absence of a flag;
  - the **visual explanation** (130401, DCM, "Visual explanation"), an IMAGE
    item naming the heat-map Secondary Capture, when one is given;
  - the **caution**, a TEXT qualitative evaluation (C0034375, UMLS,
    "Qualitative Evaluations") reading "NOT FOR DIAGNOSTIC USE ...", which a
    reader sees next to the finding in every SR viewer; the series
    description says it too, and the document is PRELIMINARY / UNVERIFIED.

Labels without a known SNOMED CT concept are coded in the private scheme
``99HDIAG`` with the label as the code value (DICOM reserves ``99`` prefixes
for local schemes), so a test or site model still yields a readable SR.

**Privacy.** The SR copies the Patient and Study modules of the source image
(name, ID, birth date, sex, accession number): that is what makes a PACS file
it into the same study, next to the image it describes, and it is how every
DICOM object about a patient is built. The SR therefore goes only where the
image itself may go: the hospital's PACS (C-STORE) and the box's report
folder. What leaves the hospital network (MQTT, FHIR built by
:mod:`.fhir`) carries none of these attributes.

**Determinism.** Series and SOP Instance UIDs are derived from the result's
``message_id`` (:func:`.uids.derived_uid`), and every date and time is the
result's ``timestamp_utc``: the same result always gives the same bytes, so a
redelivery after a crash stores the same object, not a second report.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM, format_number_as_ds

from ..errors import ReportSourceError
from ..results import ScanResult
from .header import clean_header, is_valid_uid
from .uids import derived_uid

__all__ = [
    "CAUTION",
    "FINDING_CODES",
    "MANUFACTURER",
    "SR_SERIES_NUMBER",
    "build_sr",
    "children",
    "coded",
    "device_observer_uid",
    "finding_code",
    "group_summary",
    "measurement_groups",
    "sr_summary",
]

MANUFACTURER = "HealthDiag"
#: The series number of AI result SRs: high, so it sorts after the modality's own series.
SR_SERIES_NUMBER = 9901
CAUTION = (
    "NOT FOR DIAGNOSTIC USE. Produced automatically by a research model; "
    "not reviewed by a clinician; not a medical device."
)

#: Model labels with a standard concept (SNOMED CT). Others use the private scheme below.
FINDING_CODES: dict[str, Code] = {
    "PNEUMONIA": Code("233604007", "SCT", "Pneumonia"),
}
PRIVATE_SCHEME = "99HDIAG"

PROCEDURE_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
LUNG = Code("39607008", "SCT", "Lung structure")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
#: A finding the model did not call: the scan is outside its intended use.
UNDETERMINED = Code("373068000", "SCT", "Undetermined")
COMMENT = Code("121106", "DCM", "Comment")
PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD = Code("122411", "DCM", "Threshold Value")
NO_UNITS = Code("1", "UCUM", "no units")
PRIORITY = Code("260870009", "SCT", "Priority")
URGENT = Code("103391001", "SCT", "Urgent")
ROUTINE = Code("50811001", "SCT", "Routine")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
VISUAL_EXPLANATION = Code("130401", "DCM", "Visual explanation")
MEASUREMENT_GROUP = Code("125007", "DCM", "Measurement Group")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
ALGORITHM_MANUFACTURER = Code("122405", "DCM", "Algorithm Manufacturer")
FINDING_SITE = Code("363698007", "SCT", "Finding Site")
DEVICE_OBSERVER_UID = Code("121012", "DCM", "Device Observer UID")

#: Patient and study attributes highdicom reads from the source; type 2 (may be empty), so a
#: header without them (a legacy or de-identified file) still gets an SR.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_MAX_LO = 64


def finding_code(label: str) -> Code:
    """The coded concept of a model label: SNOMED CT when known, else the private scheme."""
    return FINDING_CODES.get(label.upper(), Code(label, PRIVATE_SCHEME, label))


def _dicom_datetime(timestamp_utc: str) -> tuple[str, str]:
    """``2026-11-30T06:00:00.123Z`` -> (``20261130``, ``060000.123``): DA and TM, in UTC."""
    date, _, time = timestamp_utc.rstrip("Z").partition("T")
    hms, _, fraction = time.partition(".")
    tm = hms.replace(":", "") + (f".{fraction[:6]}" if fraction else "")
    return date.replace("-", ""), tm


def _evidence_header(source: Dataset) -> Dataset:
    """The source header as highdicom needs it: every value valid, type-2 patient/study attributes present.

    A copy (:func:`.header.clean_header`), so the caller's dataset is not
    changed; pixel data is left out (the SR references the image, it does not
    carry it). Invalid values are normalised or left out, so an odd header
    never costs the report; a missing or invalid UID does, since the SR could
    not reference the image.
    """
    header, _fixes = clean_header(source)
    missing = [k for k in _REQUIRED_UIDS if not header.get(k)]
    invalid = [k for k in _REQUIRED_UIDS if header.get(k) and not is_valid_uid(str(header.get(k)))]
    if missing or invalid:
        sop = str(header.get("SOPInstanceUID") or "")
        problems = ([f"no {', '.join(missing)}"] if missing else []) + (
            [f"an invalid {', '.join(invalid)} (not a DICOM UID)"] if invalid else []
        )
        raise ReportSourceError(
            f"cannot write a DICOM report: the scan's header has {' and '.join(problems)} "
            f"(SOP Instance UID {sop if is_valid_uid(sop) else 'unknown'})"
        )
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in header:
            setattr(header, keyword, "")
    for keyword in ("PatientName", "ReferringPhysicianName"):
        name = str(header.get(keyword) or "")
        if name and "^" not in name:
            # The same name in DICOM (trailing empty components may be dropped), but highdicom
            # warns about a one-component name, quoting it: a patient's name in the service log.
            setattr(header, keyword, f"{name}^")
    return header


def _library_view(image: Dataset) -> Dataset:
    """The attributes of ``image`` the image library (TID 1601/1602) describes.

    highdicom adds the projection-radiography descriptors (TID 1603) for CR/DX
    and needs Patient Orientation and Imager Pixel Spacing for them, which many
    real radiographs lack; without both, the entry keeps the descriptors every
    image has (modality from the SOP class, rows, columns) instead of failing.
    """
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in image:
            setattr(view, keyword, image.get(keyword))
    orientation = image.get("PatientOrientation")
    spacing = image.get("ImagerPixelSpacing")
    complete = orientation is not None and len(orientation) == 2 and spacing is not None and len(spacing) == 2
    view.Modality = image.get("Modality", "") if complete else ""
    if complete:
        view.PatientOrientation = orientation
        view.ImagerPixelSpacing = spacing
    return view


def _ds(value: float) -> float:
    """``value`` as a DICOM DS (16 characters) stores it, so the SR in memory reads as the SR on disk."""
    return float(format_number_as_ds(float(value)))


def _clip_lo(text: str) -> str:
    return text if len(text) <= _MAX_LO else text[: _MAX_LO - 3] + "..."


def not_assessed_text(result: ScanResult) -> str:
    """What an SR and a FHIR report say of a scan outside the intended use, with the reasons."""
    reasons = "; ".join(result.intended_use.reasons) or "outside the model's intended use"
    return f"Not assessed: outside the model's intended use ({reasons})."


def build_sr(
    result: ScanResult,
    source: Dataset,
    *,
    uid_root: str,
    heatmap: Dataset | None = None,
) -> Dataset:
    """The Comprehensive 3D SR of one result (see the module docstring for its content).

    ``source`` is the scan's DICOM header (read with ``stop_before_pixels``; it
    is not changed); the result's ``priority`` (``urgent``: a positive finding
    above ``Reports.UrgentThreshold``) is written as the Priority evaluation;
    ``heatmap`` the heat-map Secondary Capture, referenced as the visual
    explanation and in the image library, and recorded as evidence. The returned dataset is ready for
    ``dcmwrite(..., enforce_file_format=True)`` or C-STORE.

    Raises:
        ReportSourceError: the source header lacks a Study/Series/SOP Instance UID.
    """
    header = _evidence_header(source)
    model = result.model
    message_id = result.message_id
    urgent = result.priority == "urgent"
    content_date, content_time = _dicom_datetime(result.timestamp_utc)

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(uid_root, model.sha256, "algorithm-device"),
        name=_clip_lo(f"{model.name} {model.version}"),
        manufacturer_name=MANUFACTURER,
        model_name=_clip_lo(model.name),
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    parameters = [f"sha256={model.sha256}"] + [
        f"{key}={getattr(model, key)}" for key in ("backend", "quantization", "preprocessing_sha256")
    ]
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=parameters, manufacturer=MANUFACTURER
    )

    groups = []
    for index, finding in enumerate(result.findings):
        label = finding.label
        value = UNDETERMINED if not finding.assessed else PRESENT if finding.positive else ABSENT
        evaluation = hd.sr.QualitativeEvaluation(name=finding_code(label), value=value)
        evaluation[0].ObservationUID = derived_uid(uid_root, message_id, f"sr-observation-{index}")
        priority = hd.sr.QualitativeEvaluation(name=PRIORITY, value=URGENT if urgent else ROUTINE)
        # Outside the intended use the model's output means nothing: no probability is reported.
        measurements = (
            [
                hd.sr.Measurement(name=PROBABILITY, value=_ds(finding.probability), unit=NO_UNITS),
                hd.sr.Measurement(name=THRESHOLD, value=_ds(finding.threshold), unit=NO_UNITS),
            ]
            if finding.assessed
            else []
        )
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(uid_root, message_id, f"sr-tracking-{index}"),
                identifier=_clip_lo(f"{model.name} {label}"),
            ),
            algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)],
            measurements=measurements,
            qualitative_evaluations=[evaluation, priority],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
        )
        items = group[0].ContentSequence
        if heatmap is not None:
            items.append(
                hd.sr.ImageContentItem(
                    name=VISUAL_EXPLANATION,
                    referenced_sop_class_uid=heatmap.SOPClassUID,
                    referenced_sop_instance_uid=heatmap.SOPInstanceUID,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        if not finding.assessed:
            items.append(
                hd.sr.TextContentItem(
                    name=COMMENT,
                    value=not_assessed_text(result),
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        items.append(
            hd.sr.TextContentItem(
                name=QUALITATIVE_EVALUATIONS,
                value=CAUTION,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
        groups.append(group)

    images = [header] if heatmap is None else [header, heatmap]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=[_library_view(image) for image in images],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=images,
        content=report[0],
        series_instance_uid=derived_uid(uid_root, message_id, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(uid_root, message_id, "sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        manufacturer_model_name="edge-runtime",
        software_versions=_clip_lo(f"edge-runtime {result.runtime.version}"),
        series_description=_clip_lo(f"AI {model.name} {model.version} - NOT FOR DIAGNOSTIC USE"),
        content_date=content_date,
        content_time=content_time,
        series_date=content_date,
        series_time=content_time,
    )
    # highdicom stamps the wall clock in these; the result's time keeps a resend byte-identical.
    sr.InstanceCreationDate = DA(content_date)
    sr.InstanceCreationTime = TM(content_time)
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = content_date + content_time
    sr.TimezoneOffsetFromUTC = "+0000"
    return sr


# -- reading an SR back ----------------------------------------------------------------------


def _concept(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    """(scheme, value) of a content item's concept name (or of its coded value)."""
    if attribute not in item or not item[attribute].value:
        return "", ""
    code = item[attribute][0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
    return str(code.CodingSchemeDesignator), str(value)


def _key(code: Code) -> tuple[str, str]:
    return code.scheme_designator, code.value


def coded(item: Dataset, attribute: str = "ConceptCodeSequence") -> dict[str, str]:
    """A code sequence item as ``{"scheme", "code", "meaning"}``."""
    scheme, value = _concept(item, attribute)
    return {"scheme": scheme, "code": value, "meaning": str(item[attribute][0].CodeMeaning)}


def children(item: Dataset) -> Iterator[Dataset]:
    yield from item.get("ContentSequence", [])


def measurement_groups(sr: Dataset) -> list[Dataset]:
    """The TID 1501 measurement groups of a TID 1500 report (any Dataset: built or read from disk)."""
    groups: list[Dataset] = []
    for item in children(sr):
        if item.ValueType == "CONTAINER":
            groups.extend(
                g
                for g in children(item)
                if g.ValueType == "CONTAINER" and _concept(g) == _key(MEASUREMENT_GROUP)
            )
    return groups


def group_summary(group: Dataset) -> dict[str, Any]:
    """What one measurement group says, read from its content items (see :func:`sr_summary`)."""
    summary: dict[str, Any] = {"parameters": [], "visual_explanation": None, "caution": None}
    for item in children(group):
        name = _concept(item)
        kind = item.ValueType
        if kind == "CODE" and name == _key(PRIORITY):
            summary["priority"] = coded(item)
            summary["urgent"] = _concept(item, "ConceptCodeSequence") == _key(URGENT)
        elif kind == "CODE" and name == _key(FINDING_SITE):
            summary["finding_site"] = coded(item)
        elif kind == "CODE" and _concept(item, "ConceptCodeSequence") in (
            _key(PRESENT),
            _key(ABSENT),
            _key(UNDETERMINED),
        ):
            summary["finding"] = coded(item, "ConceptNameCodeSequence")
            summary["value"] = coded(item)
            value = _concept(item, "ConceptCodeSequence")
            summary["assessed"] = value != _key(UNDETERMINED)
            summary["present"] = value == _key(PRESENT) if summary["assessed"] else None
            summary["observation_uid"] = str(item.get("ObservationUID", "")) or None
        elif kind == "NUM" and name in (_key(PROBABILITY), _key(THRESHOLD)):
            value = item.MeasuredValueSequence[0]
            key = "probability" if name == _key(PROBABILITY) else "threshold"
            summary[key] = float(value.NumericValue)
            summary[f"{key}_unit"] = coded(value, "MeasurementUnitsCodeSequence")
        elif kind == "TEXT" and name == _key(ALGORITHM_NAME):
            summary["model_name"] = str(item.TextValue)
        elif kind == "TEXT" and name == _key(ALGORITHM_VERSION):
            summary["model_version"] = str(item.TextValue)
        elif kind == "TEXT" and name == _key(ALGORITHM_MANUFACTURER):
            summary["manufacturer"] = str(item.TextValue)
        elif kind == "TEXT" and name == _key(ALGORITHM_PARAMETERS):
            summary["parameters"].append(str(item.TextValue))
        elif kind == "TEXT" and name == _key(QUALITATIVE_EVALUATIONS):
            summary["caution"] = str(item.TextValue)
        elif kind == "TEXT" and name == _key(COMMENT):
            summary["comment"] = str(item.TextValue)
        elif kind == "IMAGE" and name == _key(VISUAL_EXPLANATION):
            ref = item.ReferencedSOPSequence[0]
            summary["visual_explanation"] = {
                "sop_class_uid": str(ref.ReferencedSOPClassUID),
                "sop_instance_uid": str(ref.ReferencedSOPInstanceUID),
            }
    params = dict(p.split("=", 1) for p in summary["parameters"] if "=" in p)
    summary["model_sha256"] = params.get("sha256")
    return summary


def device_observer_uid(sr: Dataset) -> str | None:
    """The Device Observer UID of the report's observation context (the algorithm's identity)."""
    for item in children(sr):
        if item.ValueType == "UIDREF" and _concept(item) == _key(DEVICE_OBSERVER_UID):
            return str(item.UID)
    return None


def sr_summary(sr: Dataset) -> dict[str, Any]:
    """What the SR says, read back from its content tree (built, or read from a file).

    One dict: the first finding's code/meaning, presence, probability,
    threshold, model name/version/sha256, urgency, caution, plus the UIDs
    that tie it to the study. Tests compare it with the FHIR resources built
    from the same SR, and with the result it was built from.
    """
    groups = measurement_groups(sr)
    if not groups:
        raise ValueError(f"SR {sr.get('SOPInstanceUID')} has no TID 1501 measurement group")
    first = group_summary(groups[0])
    return {
        "finding": first.get("finding"),
        "present": first.get("present"),
        "assessed": first.get("assessed", True),
        "comment": first.get("comment"),
        "probability": first.get("probability"),
        "threshold": first.get("threshold"),
        "model": {
            "name": first.get("model_name"),
            "version": first.get("model_version"),
            "sha256": first.get("model_sha256"),
            "manufacturer": first.get("manufacturer"),
        },
        "urgent": bool(first.get("urgent")),
        "caution": first.get("caution"),
        "finding_site": first.get("finding_site"),
        "observation_uid": first.get("observation_uid"),
        "visual_explanation": first.get("visual_explanation"),
        "study_instance_uid": str(sr.StudyInstanceUID),
        "series_instance_uid": str(sr.SeriesInstanceUID),
        "sop_instance_uid": str(sr.SOPInstanceUID),
        "preliminary": sr.get("PreliminaryFlag") == "PRELIMINARY",
        "groups": len(groups),
    }
