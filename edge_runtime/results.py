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
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    WrapSerializer,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from . import __version__
from .errors import InvalidDicomUid
from .privacy import is_dicom_uid

__all__ = [
    "RESULT_SCHEMA_VERSION",
    "Analysis",
    "Decision",
    "DicomFile",
    "Finding",
    "FrozenMap",
    "InputRef",
    "IntendedUseVerdict",
    "ModelRef",
    "Priority",
    "Reports",
    "Runtime",
    "ScanResult",
    "Timings",
    "analysis_of",
    "build_status",
    "check_uids",
    "input_identity",
    "load_schema",
    "message_id",
    "pixels_digest",
    "positive_index",
    "positive_probabilities",
    "public_metadata",
    "result_schema",
    "result_schema_text",
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


class FrozenMap(Mapping[str, float]):
    """A read-only mapping (the result's ``probabilities``): a frozen result has no mutable part."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, float]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> float:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"

    def __reduce__(self) -> tuple[type[FrozenMap], tuple[dict[str, float]]]:
        return FrozenMap, (self._items,)


def _as_dict(value: Mapping[str, float], serialize: SerializerFunctionWrapHandler) -> Any:
    return serialize(dict(value))


class _Frozen(BaseModel):
    """A part of the result: immutable once built, and no field the schema does not name."""

    model_config = ConfigDict(frozen=True, extra="forbid")


_SHA256 = r"^[0-9a-f]{64}$"
_DICOM_UID = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"
_FILE = r"^[a-z0-9_.-]+$"
Uid = Annotated[str, Field(pattern=_DICOM_UID, max_length=64)]
Sha256 = Annotated[str, Field(pattern=_SHA256)]
Probability = Annotated[float, Field(ge=0, le=1)]
Millis = Annotated[float, Field(ge=0)]
Priority = Literal["urgent", "routine"]


class InputRef(_Frozen):
    """The scan as the result names it: a reference, its hash, and header values fit to publish."""

    kind: Literal["dicom", "image"]
    file_name: str = Field(
        description="A keyed reference to the scan, scan-<16 hex digits>[.ext], never the name the sender "
        "gave the file, which may carry patient identifiers; only a site that sets "
        "Privacy.PublishFileNames gets the file's own name here.",
    )
    sha256: Sha256
    decoder: str
    study_instance_uid: Uid | None = None
    series_instance_uid: Uid | None = None
    sop_instance_uid: Uid | None = None
    sop_class_uid: Uid | None = None
    transfer_syntax_uid: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None
    photometric_interpretation: str | None = None
    format: str | None = None
    rows: Annotated[int, Field(ge=1)] | None = None
    columns: Annotated[int, Field(ge=1)] | None = None
    channels: Annotated[int, Field(ge=1)] | None = None
    number_of_frames: Annotated[int, Field(ge=1)] | None = None
    bits_stored: Annotated[int, Field(ge=1)] | None = None
    pixel_spacing_mm: Annotated[tuple[float, float], Field()] | None = None


class ModelRef(_Frozen):
    """Which model answered, bit for bit: its artifact's and its preprocessing's hashes."""

    name: str
    version: str
    sha256: Sha256
    backend: str
    quantization: str
    preprocessing_sha256: Sha256


class Finding(_Frozen):
    """One label the model decides on, at its operating threshold."""

    label: str
    probability: Probability
    threshold: Probability
    positive: bool | None = Field(
        description="Whether the finding is called at the operating threshold; null when the scan "
        "was not assessed (outside the model's intended use: see intended_use)."
    )
    assessed: bool = Field(
        description="False when the scan is outside the model's intended use: the probability is the "
        "model's output, but it means nothing for this scan and no call is made."
    )


class Decision(_Frozen):
    label: str = Field(description="The label decided at the model's operating point.")
    positive: bool


class IntendedUseVerdict(_Frozen):
    """Whether this scan is one the model was made for, and if not, why: part of every result.

    A result outside the intended use carries no decision (``decision`` null, each finding
    ``positive`` null and ``assessed`` false) and is never urgent. The patient's age is read
    from the header to decide, but its value never leaves the box: only whether it was checked.
    """

    within: bool = Field(description="True when nothing known about the scan falls outside the intended use.")
    reasons: tuple[str, ...] = Field(
        default=(),
        description="Why the scan is outside the intended use, one sentence each (empty when within). "
        "Fixed texts and the model's own numbers only, never a patient value.",
    )
    age_checked: bool = Field(
        description="Whether the patient's age was read from the header and compared with the "
        "model's age range (false: no range, not DICOM, or the age was missing or unreadable)."
    )
    ood_score: float | None = Field(
        default=None,
        description="How unlike the model's training images this scan is, to the model (larger is "
        "less alike); absent when the model has no out-of-distribution check.",
    )
    ood_threshold: float | None = Field(
        default=None,
        description="The score above which a scan is outside the intended use (set on validation).",
    )

    @classmethod
    def unchecked(cls) -> IntendedUseVerdict:
        """Nothing known contradicts the intended use, and nothing was checked beyond the header."""
        return cls(within=True, age_checked=False)


class Timings(_Frozen):
    """Milliseconds per stage of this scan on this box."""

    queue: Millis | None = None
    hash: Millis | None = None
    decode: Millis
    preprocess: Millis
    infer: Millis
    total: Millis | None = None
    reports: Millis | None = Field(
        default=None, description="Building and writing the SR, FHIR and heat-map files (after 'total')."
    )


class Runtime(_Frozen):
    version: str
    host: str | None = None


class DicomFile(_Frozen):
    file: str = Field(pattern=_FILE)
    sop_instance_uid: str = Field(pattern=r"^[0-9.]{1,64}$")
    series_instance_uid: str = Field(pattern=r"^[0-9.]{1,64}$")


class Reports(_Frozen):
    """The files written in Reports.Path/<folder>/ before the result was committed (each one named exists).

    With the UIDs of the DICOM objects (to find them in the PACS). Absent when no report
    applies (reports need a DICOM source, except the heat-map PNG).
    """

    folder: str = Field(
        pattern=_SHA256, description="The result's folder under Reports.Path: its message_id."
    )
    sr: DicomFile | None = Field(default=None, description="The DICOM Comprehensive 3D SR (TID 1500).")
    heatmap_png: str | None = Field(
        default=None, pattern=_FILE, description="The class-activation map over the image, PNG."
    )
    heatmap_dicom: DicomFile | None = Field(
        default=None, description="The same overlay as a DICOM Secondary Capture."
    )
    fhir: str | None = Field(
        default=None,
        pattern=_FILE,
        description="The FHIR transaction Bundle (DiagnosticReport, Observations, Device), JSON.",
    )
    error: str | None = Field(
        default=None,
        description="Why a report could not be written (the result itself stands): the fixed text of "
        "error_code, never an exception's text.",
    )
    error_code: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="The error's code (edge_runtime.errors), e.g. report_failed, report_source_invalid, "
        "report_timeout, report_process_crashed; the details are in the service log only.",
    )


class Analysis(_Frozen):
    """What the model said about one scan, before the scan has its place among the results.

    :class:`~edge_runtime.pipeline.ScanAnalyzer` makes it; the flow
    (:mod:`edge_runtime.flow`) then decides the message id (the scan's place in
    its SOP Instance UID's history), the priority and the reports, and builds the
    :class:`ScanResult` once from all of them.
    """

    timestamp_utc: str = Field(
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$",
        description="When the result was produced, UTC, ISO 8601 with a Z suffix.",
        json_schema_extra={"format": "date-time"},
    )
    input: InputRef
    model: ModelRef
    findings: tuple[Finding, ...] = Field(
        min_length=1,
        description="One entry per label the model decides on (the positive label for a binary model).",
    )
    probabilities: Annotated[
        Mapping[str, Probability],
        AfterValidator(FrozenMap),
        WrapSerializer(_as_dict, return_type=dict[str, Probability]),
    ] = Field(description="Model output per label.")
    decision: Decision | None = Field(
        description="The label decided at the operating point; null when the scan is outside the "
        "model's intended use (intended_use.within false)."
    )
    intended_use: IntendedUseVerdict
    timings_ms: Timings
    runtime: Runtime

    @property
    def finding(self) -> Finding:
        """The decided label's finding (the only one of a binary model)."""
        return self.findings[0]

    def urgency(self, urgent_threshold: float | None) -> Priority:
        """``urgent``: a positive finding at or above the urgent threshold (None: the operating threshold).

        The clinical rule lives here, with the result: the priority topic, the SR and the
        FHIR report all follow what this says.
        """
        finding = self.finding
        if not finding.assessed:
            return "routine"  # outside the intended use: no call, so never moved up a worklist
        threshold = finding.threshold if urgent_threshold is None else urgent_threshold
        return "urgent" if finding.positive and finding.probability >= float(threshold) else "routine"


class ScanResult(Analysis):
    """The result message: built once, frozen, serialised once for every sink and the journal.

    Subscribers de-duplicate by ``message_id``: the same scan analysed by the
    same model version always carries the same one, and a message may arrive
    more than once (MQTT QoS 1, re-sends after a restart).
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="Edge runtime result message, version 1",
        json_schema_extra={
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://healthdiag.example/schemas/edge-result-v1.schema.json",
        },
    )

    schema_version: Literal["1.0"]
    message_type: Literal["result"]
    message_id: str = Field(
        pattern=_SHA256,
        description="Idempotency key: sha256 hex of '<input identity>|<model name>|<model version>', where "
        "the input identity is 'sop:<SOP Instance UID>' for DICOM and 'sha256:<file sha256>' otherwise.",
    )
    supersedes: str | None = Field(
        default=None,
        pattern=_SHA256,
        description="Present when this scan carries a SOP Instance UID that an earlier, different image "
        "already carried: the message_id of that earlier result, which this one replaces. Subscribers "
        "should show the newer result and flag the study for review (the modality re-used a UID, or the "
        "image was edited and re-sent).",
    )
    not_for_diagnostic_use: Literal[True] = Field(
        description="Always true: research / workflow-support output, not a medical device.",
    )
    priority: Priority = Field(
        description="'urgent' when the finding is positive with a probability at or above the site's "
        "urgent threshold (Reports.UrgentThreshold, by default the model's operating threshold): such "
        "results are also published on the priority topic, and the SR and FHIR report say so, so a "
        "worklist can move the study up."
    )
    reports: Reports | None = None

    #: :attr:`payload`, made on first use (a private attribute: not a field of the message).
    _payload: str | None = PrivateAttr(default=None)

    @classmethod
    def of(
        cls,
        analysis: Analysis,
        *,
        message_id: str,
        priority: Priority,
        supersedes: str | None = None,
        reports: Reports | None = None,
        reports_ms: float | None = None,
    ) -> ScanResult:
        """The result of ``analysis``, placed (``message_id``, ``supersedes``), with priority and reports."""
        fields = {name: getattr(analysis, name) for name in Analysis.model_fields}
        if reports_ms is not None:
            timings = analysis.timings_ms.model_dump(exclude_none=True) | {"reports": round(reports_ms, 3)}
            fields["timings_ms"] = Timings(**timings)
        return cls(
            **fields,
            schema_version=RESULT_SCHEMA_VERSION,
            message_type="result",
            not_for_diagnostic_use=True,
            message_id=message_id,
            supersedes=supersedes,
            priority=priority,
            reports=reports,
        )

    def __eq__(self, other: object) -> bool:
        """Equal fields (whether either has been serialised yet does not matter)."""
        return isinstance(other, ScanResult) and dict(self) == dict(other)

    __hash__ = None  # type: ignore[assignment]  # probabilities is a mapping: not hashable

    def with_reports(self, reports: Reports | None, reports_ms: float) -> ScanResult:
        """This result with the reports that were built from it: a new value (this one stays as it is)."""
        return ScanResult.of(
            self,
            message_id=self.message_id,
            priority=self.priority,
            supersedes=self.supersedes,
            reports=reports,
            reports_ms=reports_ms,
        )

    @property
    def payload(self) -> str:
        """The message as every sink sends it and the journal keeps it (compact, sorted keys).

        Serialised once, on first use, and the same text for every sink: the value is frozen.
        """
        if self._payload is None:
            self._payload = json.dumps(self.message(), separators=(",", ":"), sort_keys=True)
        return self._payload

    def message(self) -> dict[str, Any]:
        """The message as JSON values: absent optional fields are left out, never ``null``.

        Except the calls a scan outside the intended use does not get: ``decision`` and each
        finding's ``positive`` are then an explicit ``null``, so a subscriber that reads them
        sees "no answer" rather than a missing key it might default.
        """
        message: dict[str, Any] = self.model_dump(mode="json", exclude_none=True)
        if self.decision is None:
            message["decision"] = None
        for out, finding in zip(message["findings"], self.findings, strict=True):
            if finding.positive is None:
                out["positive"] = None
        return message


def result_schema() -> dict[str, Any]:
    """The JSON Schema of the result message, generated from :class:`ScanResult`.

    ``edge_runtime/schemas/result-v1.schema.json`` is this (``edge-runtime schema result``
    prints it; a test compares). Optional fields are absent from a message rather than
    ``null``, so the schema names only their types.
    """
    schema = ScanResult.model_json_schema(mode="serialization", schema_generator=_NoNull)
    cleaned: dict[str, Any] = _without_defaults(schema)
    # The two explicit nulls of a scan outside the intended use (see ScanResult.message).
    decision = cleaned["properties"]["decision"]
    ref = {"$ref": decision.pop("$ref")}
    decision["anyOf"] = [ref, {"type": "null"}]
    positive = cleaned["$defs"]["Finding"]["properties"]["positive"]
    positive["type"] = ["boolean", "null"]
    return cleaned


def result_schema_text() -> str:
    """:func:`result_schema` as the shipped file holds it (``edge-runtime schema result``)."""
    return json.dumps(result_schema(), indent=2, ensure_ascii=False) + "\n"


class _NoNull(GenerateJsonSchema):
    """Optional fields are left out of a message, never ``null``: their schema is the type alone."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])


def _without_defaults(node: Any, *, root: bool = True) -> Any:
    """The schema without pydantic's ``default`` and per-field ``title`` keys (the root's title stays)."""
    if isinstance(node, dict):
        return {
            key: _without_defaults(value, root=False)
            for key, value in node.items()
            if key != "default" and (key != "title" or root or not isinstance(value, str))
        }
    if isinstance(node, list):
        return [_without_defaults(value, root=False) for value in node]
    return node


def analysis_of(
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
    intended_use: IntendedUseVerdict | None = None,
) -> Analysis:
    """What the model said, as a typed value (the flow makes the :class:`ScanResult` of it).

    ``file_name`` is what the result calls the input: its keyed reference
    (:func:`edge_runtime.privacy.scan_ref`) unless the site publishes names.
    Only the header fields the schema names are kept, and of those only values
    fit to publish (:func:`public_metadata`). ``intended_use`` None: nothing was checked beyond
    the header (:meth:`IntendedUseVerdict.unchecked`); a verdict outside it leaves the scan
    without a decision.

    Raises:
        InvalidDicomUid: a DICOM scan's Study/Series/SOP UID is not a DICOM UID (:func:`check_uids`).
    """
    check_uids(file_name, metadata)
    # Nine significant digits keep every distinct float32 output distinct (its spacing near 1 is
    # 6e-8), so subscribers can rank results; six decimals used to tie confident outputs at 1.0.
    probs = {label: float(f"{float(p):.9g}") for label, p in zip(labels, probabilities, strict=True)}
    p_positive = probs[labels[positive_index(labels, positive_label)]]
    verdict = intended_use or IntendedUseVerdict.unchecked()
    positive = p_positive >= threshold
    if len(labels) == 2:
        negative = next(label for label in labels if label != positive_label)
        decided = positive_label if positive else negative
    else:
        decided = positive_label if positive else f"not {positive_label}"
    assessed = verdict.within
    header = {k: v for k, v in public_metadata(metadata).items() if k in _HEADER_FIELDS and v is not None}
    return Analysis(
        timestamp_utc=utc_now(),
        input=InputRef(kind=kind, file_name=file_name, sha256=sha256, decoder=decoder, **header),
        model=ModelRef(**model),
        findings=(
            Finding(
                label=positive_label,
                probability=p_positive,
                threshold=float(threshold),
                positive=bool(positive) if assessed else None,
                assessed=assessed,
            ),
        ),
        probabilities=probs,
        decision=Decision(label=decided, positive=bool(positive)) if assessed else None,
        intended_use=verdict,
        timings_ms=Timings(**{k: round(float(v), 3) for k, v in timings_ms.items()}),
        runtime=Runtime(version=__version__, host=_HOST),
    )


#: The header fields a result may carry (the rest of the decoder's metadata stays in the process).
_HEADER_FIELDS = frozenset(InputRef.model_fields) - {"kind", "file_name", "sha256", "decoder"}


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
