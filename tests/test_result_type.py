"""The result is one typed, frozen value, and the shipped JSON Schema is generated from its type.

Every sink, the journal and the reports read the same :class:`~edge_runtime.results.ScanResult`;
nothing may change it once built (a new value is made instead), so what is committed is what
each sink sends.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from helpers import make_analysis
from pydantic import ValidationError

from edge_runtime import cli
from edge_runtime.results import (
    Reports,
    ScanResult,
    load_schema,
    result_schema,
    result_schema_text,
)

SHIPPED = Path(__file__).resolve().parents[1] / "edge_runtime" / "schemas" / "result-v1.schema.json"


def _result(p_positive: float = 0.8, *, urgent_threshold: float | None = None) -> ScanResult:
    analysis = make_analysis(
        np.array([1 - p_positive, p_positive]),
        metadata={"sop_instance_uid": "1.2.3.4", "modality": "CR", "rows": 10, "columns": 12},
    )
    return ScanResult.of(analysis, message_id="d" * 64, priority=analysis.urgency(urgent_threshold))


def test_the_shipped_schema_is_the_one_generated_from_the_type(capsys: pytest.CaptureFixture[str]) -> None:
    assert SHIPPED.read_text(encoding="utf-8") == result_schema_text(), (
        "edge_runtime/schemas/result-v1.schema.json differs from the typed result: regenerate it with "
        "'edge-runtime schema result > edge_runtime/schemas/result-v1.schema.json' and review the diff"
    )
    assert load_schema("result-v1") == result_schema()
    assert cli.main(["schema", "result"]) == 0
    assert json.loads(capsys.readouterr().out) == result_schema()


def test_no_field_of_a_built_result_can_be_set_or_changed_in_place() -> None:
    result = _result()
    before = result.payload
    for name in ScanResult.model_fields:
        with pytest.raises(ValidationError, match="frozen"):
            setattr(result, name, getattr(result, name))
    with pytest.raises(ValidationError, match="frozen"):
        result.finding.positive = False  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        result.timings_ms.reports = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        result.probabilities["PNEUMONIA"] = 0.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        result.findings.append(result.finding)  # type: ignore[attr-defined]
    # What the sinks get to read and change is a copy: the result, and its payload, stay.
    message = result.message()
    message["priority"] = "routine"
    message["findings"][0]["positive"] = False
    assert result.payload == before and result.priority == "urgent" and result.finding.positive


def test_reports_make_a_new_result_and_every_sink_reads_one_payload() -> None:
    unreported = _result()
    links = Reports(folder=unreported.message_id, sr=None, fhir="fhir.json")
    result = unreported.with_reports(links, 12.3456)
    assert unreported.reports is None and unreported.timings_ms.reports is None
    assert result.reports == links and result.timings_ms.reports == 12.346
    assert result.payload is result.payload  # serialised once
    message = json.loads(result.payload)
    jsonschema.Draft202012Validator(load_schema("result-v1")).validate(message)
    assert "null" not in result.payload  # absent fields are left out, never null
    assert ScanResult.model_validate(message) == result  # a subscriber's copy reads back the same
    assert pickle.loads(pickle.dumps(result)) == result  # it crosses to the report process


@pytest.mark.parametrize(
    ("p_positive", "urgent_threshold", "priority"),
    [(0.8, None, "urgent"), (0.8, 0.9, "routine"), (0.95, 0.9, "urgent"), (0.3, 0.0, "routine")],
)
def test_priority_is_decided_with_the_result(
    p_positive: float, urgent_threshold: float | None, priority: str
) -> None:
    result = _result(p_positive, urgent_threshold=urgent_threshold)
    assert result.priority == priority
    assert result.finding.positive is (p_positive >= 0.5)


def test_header_fields_the_schema_does_not_name_never_reach_the_message() -> None:
    analysis = make_analysis(
        np.array([0.4, 0.6]),
        metadata={"modality": "LEFT KNEE OF SMITH JANE", "patient_age": "045Y", "rows": 10},
    )
    text = ScanResult.of(analysis, message_id="d" * 64, priority="routine").payload
    assert "SMITH" not in text and "045Y" not in text and "patient_age" not in text
    assert json.loads(text)["input"]["rows"] == 10
