"""What a result may say once it leaves the hospital: AWS IoT Core, Azure IoT Hub.

Every sink whose far end is a cloud sends :func:`cloud_json`, so the rule is
written once: no patient or study identifier, no file name, no content hash.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ReportError, public_text
from ..results import ScanResult

__all__ = ["CLOUD_INPUT_FIELDS", "CLOUD_REPORT_FIELDS", "cloud_json", "cloud_payload"]

#: Input fields that may leave the hospital: none identifies the patient or the study.
CLOUD_INPUT_FIELDS = (
    "kind",
    "decoder",
    "modality",
    "body_part_examined",
    "view_position",
    "rows",
    "columns",
    "bits_stored",
    "photometric_interpretation",
)


#: Report links that may leave the hospital: our own file names and UIDs (derived from message_id).
CLOUD_REPORT_FIELDS = ("folder", "sr", "heatmap_png", "heatmap_dicom", "fhir")


def cloud_payload(result: ScanResult) -> dict[str, Any]:
    """The result without patient or study identifiers, file names or content hashes.

    The ``message_id`` stays: it is a one-way hash that lets the cloud drop
    repeats, and lets the hospital (which has the full message) join the two.
    ``reports`` keeps which reports exist and, when they failed, the error's
    code with its fixed text, written here from the code
    (:func:`~edge_runtime.errors.public_text`), so no other text reaches the cloud.
    """
    redacted = result.message()
    redacted["input"] = {k: v for k, v in redacted["input"].items() if k in CLOUD_INPUT_FIELDS}
    redacted["runtime"] = {"version": result.runtime.version}
    reports = redacted.get("reports")
    if isinstance(reports, dict):
        kept = {k: v for k, v in reports.items() if k in CLOUD_REPORT_FIELDS}
        if "error" in reports:
            code = str(reports.get("error_code") or ReportError.code)
            kept.update(error_code=code, error=public_text(code))
        redacted["reports"] = kept
    return redacted


def cloud_json(result: ScanResult) -> str:
    """What a cloud gets for a result: :func:`cloud_payload` as compact JSON."""
    return json.dumps(cloud_payload(result), separators=(",", ":"), sort_keys=True)
