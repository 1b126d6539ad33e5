"""The SR of one result as FHIR R5 resources, mapped the way the HL7 DICOM SR IG maps TID 1500.

Hospital systems outside imaging read FHIR, not DICOM SR. :func:`fhir_from_sr`
reads the SR that :func:`.sr.build_sr` wrote -- its content tree, not the MQTT
result -- so the two outputs cannot say different things. The mapping follows
the HL7 "DICOM SR to FHIR Resource Mapping" implementation guide
(``http://hl7.org/fhir/uv/dicom-sr``) for TID 1500 / TID 1501 content:

* each finding's **qualitative evaluation** (``finding = Present/Absent``) becomes
  an ``Observation`` shaped like the IG's ``ImagingQualitativeEvaluation``:
  ``identifier`` = the content item's Observation UID (``urn:dicom:uid``, type
  ``observation-uid``), ``code`` = its concept name, ``valueCodeableConcept`` =
  its value, category (C0034375, UMLS, "Qualitative Evaluations") plus
  ``imaging``, ``bodySite`` = the group's Finding Site, ``device`` = the
  algorithm's ``Device``, ``partOf`` = the ``ImagingStudy`` by identifier
  (type (110180, DCM, "Study Instance UID"), ``urn:dicom:uid``,
  ``urn:oid:<StudyInstanceUID>``), ``issued``/``effective`` = the SR's content
  date/time.
* the group's **measurements** and its Priority evaluation, which only mean
  something next to that finding, are ``component`` s of the same Observation
  (probability and threshold as ``valueQuantity`` in UCUM ``1``; priority as
  ``valueCodeableConcept``), where the IG would emit a measurement-group
  Observation with one member Observation each. One Observation per finding
  is what an EHR displays and queries; the codes are the SR's own.
* ``interpretation`` is v3 ObservationInterpretation ``POS``/``NEG``. An urgent
  result is *not* coded ``AA`` (critical abnormal): that asserts a clinical
  state, which a not-for-diagnostic-use model must not. Urgency is a workflow
  priority, so it is a ``meta.tag`` from v3 ActPriority (``UR``, "urgent") on
  the Observation and the DiagnosticReport -- a worklist can search
  ``_tag=...|UR`` -- besides the Priority component.
* ``status`` is ``preliminary`` (the SR is PRELIMINARY/UNVERIFIED) and the SR's
  caution text is the Observation's ``note`` and the report's ``conclusion``.
* the **Algorithm Identification** (TID 4019) and Device Observer become one
  ``Device`` as the IG's ``AlgorithmIdentification`` profile maps it:
  ``displayName`` = Algorithm Name, ``version`` = Algorithm Version,
  ``property`` = each Algorithm Parameter (so the model artifact's
  ``sha256=...``), ``identifier`` = the Device Observer UID.
* the **visual explanation** (heat-map Secondary Capture), when the SR has
  one, is an ``ImagingSelection`` (code (130401, DCM, "Visual explanation"))
  the Observation is ``derivedFrom``.
* a ``DiagnosticReport`` (category RAD, LOINC 18748-4 "Diagnostic imaging
  study") gathers the Observations, names the study in ``study`` and carries
  two identifiers: the result's ``message_id`` and the SR's SOP Instance UID.

**Privacy.** No patient name, ID, birth date or sex appears, and ``subject`` is
left out (the IG makes it 1..1; a consumer joins on the Study Instance UID,
which the hospital's own systems resolve to the patient). The resources
therefore do not claim the IG's profiles in ``meta.profile``.

**Idempotence.** The Bundle is a ``transaction`` of ``PUT`` s whose ids derive
from ``message_id`` (the Device's from the model identity), so a resend
updates the same resources instead of creating new ones.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydicom.dataset import Dataset

from ..errors import FhirReportError
from ..results import ScanResult
from .sr import (
    ALGORITHM_PARAMETERS,
    PRIORITY,
    PROBABILITY,
    THRESHOLD,
    device_observer_uid,
    group_summary,
    measurement_groups,
)

__all__ = ["FHIR_SYSTEMS", "MESSAGE_ID_SYSTEM", "fhir_from_sr"]

#: DICOM coding scheme designators as FHIR code system URIs (HL7 DICOM SR IG; terminology.hl7.org).
FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "UMLS": "http://terminology.hl7.org/CodeSystem/umls",
    "99HDIAG": "https://healthdiag.example/fhir/CodeSystem/model-labels",
}
MESSAGE_ID_SYSTEM = "https://healthdiag.example/fhir/sid/result-message-id"
_DICOM_UID = "urn:dicom:uid"
_IDENTIFIER_TYPE = "http://hl7.org/fhir/uv/dicom-sr/CodeSystem/dicom-identifier-type"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_ACT_PRIORITY = "http://terminology.hl7.org/CodeSystem/v3-ActPriority"
_URGENT_TAG = {"system": _ACT_PRIORITY, "code": "UR", "display": "urgent"}


def _system(scheme: str) -> str:
    return FHIR_SYSTEMS.get(scheme, f"https://healthdiag.example/fhir/CodeSystem/dicom-{scheme.lower()}")


def _coding(code: dict[str, str]) -> dict[str, str]:
    return {"system": _system(code["scheme"]), "code": code["code"], "display": code["meaning"]}


def _concept(code: dict[str, str]) -> dict[str, Any]:
    return {"coding": [_coding(code)], "text": code["meaning"]}


def _dcm(value: str, meaning: str) -> dict[str, Any]:
    return _concept({"scheme": "DCM", "code": value, "meaning": meaning})


def _key_code(code: Any) -> dict[str, str]:
    """A pydicom ``Code`` as the dicts :func:`.sr.group_summary` returns."""
    return {"scheme": code.scheme_designator, "code": code.value, "meaning": code.meaning}


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _instant(sr: Dataset) -> str:
    """The SR's Content Date/Time as a FHIR instant (its Timezone Offset; UTC when absent)."""
    date = str(sr.ContentDate)
    time, _, fraction = str(sr.ContentTime).partition(".")
    time = time.ljust(6, "0")
    offset = str(sr.get("TimezoneOffsetFromUTC") or "+0000")
    zone = "Z" if offset in ("+0000", "-0000") else f"{offset[:3]}:{offset[3:]}"
    return (
        f"{date[:4]}-{date[4:6]}-{date[6:8]}T{time[:2]}:{time[2:4]}:{time[4:6]}"
        + (f".{fraction}" if fraction else "")
        + zone
    )


def _resource_id(message_id: str, role: str) -> str:
    """A FHIR id (<= 64 of ``[A-Za-z0-9.-]``) for one resource of one result."""
    return f"{message_id[:40]}-{role}"


def _evidence_series(sr: Dataset, sop_instance_uid: str) -> str | None:
    """The Series Instance UID the SR's evidence lists for an instance it references."""
    for name in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(name, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for sop in series.get("ReferencedSOPSequence", []):
                    if sop.ReferencedSOPInstanceUID == sop_instance_uid:
                        return str(series.SeriesInstanceUID)
    return None


def _device(group: dict[str, Any], observer_uid: str | None) -> dict[str, Any]:
    name = group.get("model_name") or "unknown model"
    version = group.get("model_version") or ""
    parameters: list[str] = group["parameters"]
    identity = hashlib.sha256("|".join([name, version, *parameters]).encode()).hexdigest()
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": f"algorithm-{identity[:40]}",
        "status": "active",
        "displayName": name,
        "name": [{"value": name, "type": "user-friendly-name"}],
        "version": [{"value": version}] if version else [],
        "property": [
            {"type": _concept(_key_code(ALGORITHM_PARAMETERS)), "valueString": parameter}
            for parameter in parameters
        ],
    }
    if group.get("manufacturer"):
        device["manufacturer"] = group["manufacturer"]
    if observer_uid:
        device["identifier"] = [{"system": _DICOM_UID, "value": _oid(observer_uid)}]
    return {key: value for key, value in device.items() if value != []}


def _quantity_component(code: Any, value: float, unit: dict[str, str] | None) -> dict[str, Any]:
    unit = unit or {"scheme": "UCUM", "code": "1", "meaning": "no units"}
    return {
        "code": _concept(_key_code(code)),
        "valueQuantity": {
            "value": value,
            "unit": unit["code"],
            "system": _system(unit["scheme"]),
            "code": unit["code"],
        },
    }


def _validate(bundle: dict[str, Any]) -> None:
    """Construct every resource with ``fhir.resources`` (R5), so an invalid one is never sent."""
    from fhir.resources import get_fhir_model_class
    from pydantic import ValidationError

    try:
        get_fhir_model_class("Bundle").model_validate(bundle)
        for entry in bundle["entry"]:
            resource = entry["resource"]
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except ValidationError as exc:
        raise FhirReportError(f"FHIR report for SR is invalid: {exc}") from exc


def fhir_from_sr(sr: Dataset, result: ScanResult) -> dict[str, Any]:
    """A FHIR R5 transaction Bundle (Device, ImagingSelection, Observations, DiagnosticReport).

    Everything clinical is read from ``sr`` (see the module docstring); from
    ``result`` only its ``message_id``, which the SR does not carry, names the
    resources. The Bundle is validated with ``fhir.resources`` before it is
    returned.

    Raises:
        ValueError: ``sr`` has no TID 1501 measurement group (not one of ours).
        FhirReportError: the resources fail FHIR validation.
    """
    message_id = result.message_id
    groups = [group_summary(group) for group in measurement_groups(sr)]
    if not groups:
        raise ValueError(f"SR {sr.get('SOPInstanceUID')} has no TID 1501 measurement group")
    study_uid = str(sr.StudyInstanceUID)
    study = {
        "type": "ImagingStudy",
        "identifier": {
            "type": _dcm("110180", "Study Instance UID"),
            "system": _DICOM_UID,
            "value": _oid(study_uid),
        },
    }
    when = _instant(sr)
    urgent = any(group.get("urgent") for group in groups)
    meta = {"tag": [_URGENT_TAG]} if urgent else None

    resources: list[dict[str, Any]] = []
    devices: dict[str, dict[str, Any]] = {}
    observations: list[dict[str, Any]] = []
    observer_uid = device_observer_uid(sr)
    for index, group in enumerate(groups):
        if "finding" not in group:
            continue
        device = _device(group, observer_uid)
        devices.setdefault(device["id"], device)
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "id": _resource_id(message_id, f"observation-{index}"),
            "status": "preliminary",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "imaging",
                            "display": "Imaging",
                        }
                    ]
                },
                _concept({"scheme": "UMLS", "code": "C0034375", "meaning": "Qualitative Evaluations"}),
            ],
            "code": _concept(group["finding"]),
            "partOf": [study],
            "effectiveDateTime": when,
            "issued": when,
            "device": {"reference": f"Device/{device['id']}"},
            "valueCodeableConcept": _concept(group["value"]),
            "interpretation": [{"coding": [_interpretation(group)]}],
            "component": [],
        }
        if meta is not None and group.get("urgent"):
            observation["meta"] = meta
        if group.get("observation_uid"):
            observation["identifier"] = [
                {
                    "type": {
                        "coding": [
                            {
                                "system": _IDENTIFIER_TYPE,
                                "code": "observation-uid",
                                "display": "Observation UID",
                            }
                        ]
                    },
                    "system": _DICOM_UID,
                    "value": _oid(group["observation_uid"]),
                }
            ]
        if group.get("finding_site"):
            observation["bodySite"] = _concept(group["finding_site"])
        if "probability" in group:
            observation["component"].append(
                _quantity_component(PROBABILITY, group["probability"], group.get("probability_unit"))
            )
        if "threshold" in group:
            observation["component"].append(
                _quantity_component(THRESHOLD, group["threshold"], group.get("threshold_unit"))
            )
        if "priority" in group:
            observation["component"].append(
                {"code": _concept(_key_code(PRIORITY)), "valueCodeableConcept": _concept(group["priority"])}
            )
        if group.get("caution"):
            observation["note"] = [{"text": group["caution"]}]
        explanation = group.get("visual_explanation")
        if explanation is not None:
            selection: dict[str, Any] = {
                "resourceType": "ImagingSelection",
                "id": _resource_id(message_id, f"visual-explanation-{index}"),
                "status": "available",
                "code": _dcm("130401", "Visual explanation"),
                "derivedFrom": [study],
                "studyUid": study_uid,
                "instance": [
                    {
                        "uid": explanation["sop_instance_uid"],
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": _oid(explanation["sop_class_uid"]),
                        },
                    }
                ],
            }
            series = _evidence_series(sr, explanation["sop_instance_uid"])
            if series:
                selection["seriesUid"] = series
            resources.append(selection)
            observation["derivedFrom"] = [{"reference": f"ImagingSelection/{selection['id']}"}]
        observations.append(observation)

    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": _resource_id(message_id, "report"),
        "identifier": [
            {"system": MESSAGE_ID_SYSTEM, "value": message_id},
            {"system": _DICOM_UID, "value": _oid(str(sr.SOPInstanceUID))},
        ],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
            ],
            "text": "AI result",
        },
        "effectiveDateTime": when,
        "issued": when,
        "study": [study],
        "result": [{"reference": f"Observation/{o['id']}"} for o in observations],
        "conclusion": _conclusion(groups, urgent),
    }
    if meta is not None:
        report["meta"] = meta
    entries = [*devices.values(), *resources, *observations, report]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": _resource_id(message_id, "bundle"),
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in entries
        ],
    }
    _validate(bundle)
    return bundle


def _interpretation(group: dict[str, Any]) -> dict[str, str]:
    """POS / NEG, or IND (indeterminate) for a finding not assessed (outside the intended use)."""
    if group.get("present") is None:
        return {"system": _INTERPRETATION, "code": "IND", "display": "Indeterminate"}
    if group["present"]:
        return {"system": _INTERPRETATION, "code": "POS", "display": "Positive"}
    return {"system": _INTERPRETATION, "code": "NEG", "display": "Negative"}


def _conclusion(groups: list[dict[str, Any]], urgent: bool) -> str:
    """One line per finding, then the urgency and the caution the SR carries."""
    lines = []
    for group in groups:
        if "finding" not in group:
            continue
        if group.get("present") is None:
            state = group.get("comment") or "Not assessed: outside the model's intended use."
            lines.append(f"{group['finding']['meaning']}: {state[0].lower()}{state[1:]}")
            continue
        state = "present" if group["present"] else "absent"
        line = f"{group['finding']['meaning']}: {state}"
        if "probability" in group and "threshold" in group:
            line += f" (probability {group['probability']:.3f}, operating threshold {group['threshold']:.3f})"
        model = " ".join(v for v in (group.get("model_name"), group.get("model_version")) if v)
        lines.append(f"{line}, by {model}." if model else f"{line}.")
    if urgent:
        lines.append("Flagged URGENT for worklist triage.")
    caution = next((g["caution"] for g in groups if g.get("caution")), None)
    if caution:
        lines.append(caution)
    return " ".join(lines)
