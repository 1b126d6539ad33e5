"""Result and status messages (schemas in ``edge_runtime/schemas/``).

The result message is the product's public contract with hospital systems:
versioned, validated by tests against ``result-v1.schema.json``, and
idempotent: ``message_id`` is the same whenever the same scan is analysed by
the same model version, so a subscriber can drop repeats that QoS 1 or a
restart may cause.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import numpy as np

from . import __version__
from .errors import InvalidDicomUid
from .privacy import is_dicom_uid

__all__ = [
    "RESULT_SCHEMA_VERSION",
    "build_result",
    "build_status",
    "check_uids",
    "input_identity",
    "load_schema",
    "message_id",
    "pixels_digest",
    "positive_index",
    "positive_probabilities",
    "public_metadata",
    "scores_to_probabilities",
    "utc_now",
]

RESULT_SCHEMA_VERSION = "1.0"
_HOST = socket.gethostname()


def utc_now() -> str:
    """UTC timestamp, ISO 8601, millisecond precision, ``Z`` suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def load_schema(name: str = "result-v1") -> dict[str, Any]:
    text = (resources.files("edge_runtime") / "schemas" / f"{name}.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def input_identity(sha256: str, metadata: dict[str, Any], pixels_sha256: str | None = None) -> str:
    """What makes two inputs the same scan (and so one result, one ``message_id``).

    A DICOM instance is the same only if its SOP Instance UID *and* its decoded
    pixels match: the same image re-sent in another (lossless) transfer syntax
    is a repeat, but a different image under a UID already seen is a new
    result, never silently dropped. Other files are identified by content.
    """
    sop = metadata.get("sop_instance_uid")
    if not sop:
        return f"sha256:{sha256}"
    return f"sop:{sop}|pixels:{pixels_sha256}" if pixels_sha256 else f"sop:{sop}"


def pixels_digest(pixels: np.ndarray) -> str:
    """sha256 of a decoded image (shape, dtype and values): equal for one image in any lossless syntax."""
    array = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{array.shape}|{array.dtype.str}|".encode())
    digest.update(array.data)  # the buffer itself: tobytes() would copy it (14 MB for a CR)
    return digest.hexdigest()


def message_id(identity: str, model_name: str, model_version: str) -> str:
    return hashlib.sha256(f"{identity}|{model_name}|{model_version}".encode()).hexdigest()


def scores_to_probabilities(raw: np.ndarray, activation: str) -> np.ndarray:
    """Apply the manifest's output activation to one sample's raw scores."""
    scores = np.asarray(raw, dtype=np.float64).reshape(-1)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-scores))
    if activation == "softmax":
        shifted = np.exp(scores - scores.max())
        probs = shifted / shifted.sum()
    else:
        probs = np.clip(scores, 0.0, 1.0)
    if probs.size == 2 and abs(probs.sum() - 1.0) < 1e-3:
        # A float32 softmax rounds every P > 1 - 6e-8 to exactly 1.0, but the smaller class keeps
        # its precision (1e-12 is a float32). Taking the larger as 1 - smaller keeps confident
        # results ranked instead of tied at 1.0.
        small = int(np.argmin(probs))
        probs[1 - small] = 1.0 - probs[small]
    result: np.ndarray = probs
    return result


def positive_index(labels: Sequence[str], positive_label: str) -> int:
    """Which output column is P(positive): the only one of a one-label model, else the label's."""
    return 0 if len(labels) == 1 else list(labels).index(positive_label)


def positive_probabilities(
    raw: np.ndarray, *, labels: Sequence[str], positive_label: str, activation: str
) -> np.ndarray:
    """P(positive) for each row of a backend's raw ``(N, K)`` output, as :func:`build_result` states it.

    Training, its reports and the benchmarks score through this, with the
    manifest's labels and activation, so the numbers they publish are the
    ones a box computes (not a hard-coded column of a softmax).
    """
    rows = np.asarray(raw).reshape(len(raw), -1)
    index = positive_index(labels, positive_label)
    return np.array([scores_to_probabilities(row, activation)[index] for row in rows], dtype=np.float64)


#: Header fields of VR CS (code strings): only values that are codes are published.
_CODE_FIELDS = ("modality", "body_part_examined", "view_position", "photometric_interpretation")
_CODE = re.compile(r"^[A-Z0-9 _]{1,16}$")


def public_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Header metadata fit to publish: a code-string field holding free text is set to None.

    Such fields are codes (``CHEST``, ``PA``); a modality that fills one with free
    text ("LEFT KNEE of SMITH JANE") may be writing a name into it, so the value
    stays on the box (the intake check still reads it).
    """
    public = dict(metadata)
    for key in _CODE_FIELDS:
        value = public.get(key)
        if value is not None and not _CODE.match(str(value)):
            public[key] = None
    return public


#: The header's UIDs a result names (and an SR references), with the attribute each comes from.
_UID_FIELDS = {
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
}


def check_uids(file_name: str, metadata: dict[str, Any]) -> None:
    """Refuse a scan whose header carries a UID that is not a DICOM UID (PS3.5 §9.1).

    Refused, not replaced: a UID is the only thing that ties a result, its SR,
    heat-map and FHIR report to the image in the PACS. Reports under a
    replacement UID would point at an image that does not exist there (a PACS
    would file them as a study of their own), and a subscriber would key the
    result on an identifier nothing else carries; publishing the value as it
    is puts whatever the sender wrote (``../../../../tmp/x``, a name) on the
    wire and into an SR that DICOM tools reject. The scan is quarantined
    instead, with :class:`~edge_runtime.errors.InvalidDicomUid` naming the
    attribute (never its value), so the admin has the sending device fixed.

    Raises:
        InvalidDicomUid: one of the Study, Series, SOP Instance or SOP Class UIDs is invalid.
    """
    invalid = [
        keyword
        for key, keyword in _UID_FIELDS.items()
        if metadata.get(key) is not None and not is_dicom_uid(str(metadata[key]))
    ]
    if invalid:
        raise InvalidDicomUid(
            f"{file_name} carries a {', '.join(invalid)} that is not a valid DICOM UID (digits and "
            "dots, no leading zeros, at most 64 characters); it was not published."
        )


def build_result(
    *,
    file_name: str,
    sha256: str,
    kind: str,
    decoder: str,
    metadata: dict[str, Any],
    model: dict[str, str],
    labels: list[str],
    probabilities: np.ndarray,
    positive_label: str,
    threshold: float,
    timings_ms: dict[str, float],
    pixels_sha256: str | None = None,
) -> dict[str, Any]:
    """Assemble one schema-valid result message.

    ``file_name`` is what the result calls the input: its keyed reference
    (:func:`edge_runtime.privacy.scan_ref`) unless the site publishes names.
    Header values that should be DICOM codes but are free text are left out
    (:func:`public_metadata`).

    Raises:
        InvalidDicomUid: a DICOM scan's Study/Series/SOP UID is not a DICOM UID (:func:`check_uids`).
    """
    check_uids(file_name, metadata)
    # Nine significant digits keep every distinct float32 output distinct (its spacing near 1 is
    # 6e-8), so subscribers can rank results; six decimals used to tie confident outputs at 1.0.
    probs = {label: float(f"{float(p):.9g}") for label, p in zip(labels, probabilities, strict=True)}
    p_positive = probs[labels[positive_index(labels, positive_label)]]
    positive = p_positive >= threshold
    if len(labels) == 2:
        negative = next(label for label in labels if label != positive_label)
        decided = positive_label if positive else negative
    else:
        decided = positive_label if positive else f"not {positive_label}"
    identity = input_identity(sha256, metadata, pixels_sha256)
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "message_type": "result",
        "message_id": message_id(identity, model["name"], model["version"]),
        "timestamp_utc": utc_now(),
        "not_for_diagnostic_use": True,
        "input": {
            "kind": kind,
            "file_name": file_name,
            "sha256": sha256,
            "decoder": decoder,
        }
        | public_metadata(metadata),
        "model": dict(model),
        "findings": [
            {
                "label": positive_label,
                "probability": p_positive,
                "threshold": float(threshold),
                "positive": bool(positive),
            }
        ],
        "probabilities": probs,
        "decision": {"label": decided, "positive": bool(positive)},
        "timings_ms": {k: round(float(v), 3) for k, v in timings_ms.items()},
        "runtime": {"version": __version__, "host": _HOST},
    }


def build_status(
    state: str,
    client_id: str,
    *,
    reason: str | None = None,
    model: dict[str, Any] | None = None,
    counters: dict[str, int] | None = None,
    last_error: str | None = None,
) -> dict[str, Any]:
    """A retained status message (also used for the last will)."""
    message: dict[str, Any] = {
        "schema_version": "1.0",
        "message_type": "status",
        "state": state,
        "timestamp_utc": utc_now(),
        "client_id": client_id,
        "runtime_version": __version__,
    }
    if reason:
        message["reason"] = reason
    if model:
        message["model"] = model
    if counters is not None:
        message["counters"] = counters
    if last_error:
        message["last_error"] = last_error
    return message
