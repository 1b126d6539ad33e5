"""Issue 26: a scan outside the model's intended use gets no answer, and says so, everywhere.

The age is read from the header and never leaves the process; the out-of-distribution score
comes from the model's own features output; a result outside the intended use carries no
decision (MQTT payload, schema, priority), and its SR and FHIR report say "not assessed" with
the reasons. Real SR tools (dsrdump, dciodvfy) read what is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import jsonschema
import numpy as np
import pydicom
import pytest

from edge_runtime.age import read_age
from edge_runtime.errors import OutsideIntendedUse
from edge_runtime.intake import ScopeCheck
from edge_runtime.ood import LayerStats, OodModel
from edge_runtime.reports.fhir import fhir_from_sr
from edge_runtime.reports.sr import build_sr, sr_summary
from edge_runtime.results import IntendedUseVerdict, ScanResult, load_schema
from tests.helpers import dcmtk, make_analysis

RG1 = "dicom/pydicom_data/RG1_UNCR.dcm"
MESSAGE_ID = "a" * 64


# -- the age ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "birth", "study", "acquisition", "years", "source"),
    [
        ("045Y", None, None, None, 45.0, "PatientAge"),
        ("018M", None, None, None, 1.5, "PatientAge"),
        ("003W", None, None, None, 21 / 365.25, "PatientAge"),
        ("010D", None, None, None, 10 / 365.25, "PatientAge"),
        ("5Y", None, None, None, 5.0, "PatientAge"),  # leading zeros dropped by some senders
        ("", "20190101", "20261130", None, 7.91, "PatientBirthDate"),
        (None, "2019.01.01", None, "2021.01.01", 2.0, "PatientBirthDate"),  # ACR-NEMA dates
        ("045Y", "20190101", "20261130", None, 45.0, "PatientAge"),  # the modality's own age wins
        (None, None, "20261130", None, None, "missing"),
        ("62", None, None, None, None, "unreadable"),  # no unit: not guessed as years
        ("45 years", None, None, None, None, "unreadable"),
        ("200Y", None, None, None, None, "unreadable"),
        (None, "20270101", "20261130", None, None, "unreadable"),  # born after the study
        (None, "20190101", None, None, None, "unreadable"),  # no date to count to
        (None, "2019-13-45", "20261130", None, None, "unreadable"),
    ],
)
def test_the_age_comes_from_the_header_and_is_never_guessed(
    age: str | None,
    birth: str | None,
    study: str | None,
    acquisition: str | None,
    years: float | None,
    source: str,
) -> None:
    reading = read_age(age, birth, study, acquisition)
    assert reading.source == source
    if years is None:
        assert reading.years is None and not reading.known
    else:
        assert reading.years == pytest.approx(years, abs=0.01)


def test_the_decoder_reads_the_age_but_no_message_or_log_carries_it(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RG1 (born 1940, studied 2004): the decoder knows 64 years; the result only that it checked."""
    from edge_runtime.decode import decode_file

    decoded = decode_file(shared_data / RG1)
    assert decoded.metadata["age_source"] == "PatientBirthDate"
    assert decoded.metadata["patient_age_years"] == pytest.approx(64.47, abs=0.01)
    scope = ScopeCheck(age_years=(0.0, 10.0), model_name="model m 1")
    verdict = scope.verdict("dicom", decoded.metadata, None)
    result = ScanResult.of(
        make_analysis([0.1, 0.9], metadata=decoded.metadata, intended_use=verdict),
        message_id=MESSAGE_ID,
        priority="routine",
    )
    assert verdict.age_checked and not verdict.within
    assert verdict.reasons == ("patient age outside the model's range (0 to 10 years)",)
    assert "64" not in result.payload and "1940" not in result.payload
    assert "age_source" not in result.payload and "patient_age" not in result.payload


# -- the verdict --------------------------------------------------------------------------------


def _ood(dim: int = 3) -> OodModel:
    """One layer: squared distance to the origin (identity precision), log not rescaled."""
    return OodModel((LayerStats(np.zeros(dim), np.eye(dim), 0.0, 1.0),))


def test_the_verdict_reads_age_and_ood_and_states_what_it_could_not_check() -> None:
    scope = ScopeCheck(age_years=(0.0, 10.0), ood=_ood(), ood_threshold=0.0, model_name="model m 1")
    near = np.full((1, 3), 0.1)  # log(0.03) < 0: like training
    far = np.full((1, 3), 2.0)  # log(12) > 0: unlike it
    child = {"patient_age_years": 4.0, "age_source": "PatientAge"}

    inside = scope.verdict("dicom", child, near)
    assert inside.within and inside.age_checked and inside.reasons == ()
    assert inside.ood_score == pytest.approx(np.log(0.03), abs=1e-3) and inside.ood_threshold == 0.0

    outside = scope.verdict("dicom", {"patient_age_years": 45.0}, far)
    assert not outside.within and len(outside.reasons) == 2
    assert outside.reasons[0].startswith("patient age outside")
    assert outside.reasons[1].startswith("image unlike the model's training images")

    # A PNG has no header, an unreadable age is not an age: both stated as not checked, not guessed.
    assert not scope.verdict("image", {}, near).age_checked
    assert not scope.verdict(
        "dicom", {"age_source": "unreadable", "patient_age_years": None}, near
    ).age_checked

    with pytest.raises(OutsideIntendedUse, match="not assessed"):
        ScopeCheck(age_years=(0.0, 10.0), quarantine=True).enforce(
            "scan-1", ScopeCheck(age_years=(0.0, 10.0)).verdict("dicom", {"patient_age_years": 45.0}, None)
        )
    ScopeCheck(quarantine=True).enforce("scan-1", inside)  # within: nothing raised


def test_a_model_with_an_ood_check_but_no_features_is_an_engine_fault() -> None:
    from edge_runtime.errors import BackendError

    with pytest.raises(BackendError, match="features"):
        ScopeCheck(ood=_ood(), ood_threshold=0.0).verdict("image", {}, None)


# -- the result: no decision outside the intended use -------------------------------------------


def _outside_result(probabilities: list[float] = [0.01, 0.99]) -> ScanResult:  # noqa: B006
    verdict = IntendedUseVerdict(
        within=False,
        reasons=("image unlike the model's training images (out-of-distribution score 9.10, above 2.00)",),
        age_checked=False,
        ood_score=9.1,
        ood_threshold=2.0,
    )
    analysis = make_analysis(probabilities, intended_use=verdict)
    return ScanResult.of(analysis, message_id=MESSAGE_ID, priority=analysis.urgency(None))


def test_a_result_outside_the_intended_use_has_no_decision_and_is_never_urgent() -> None:
    result = _outside_result()
    message = json.loads(result.payload)
    assert message["decision"] is None
    assert message["findings"][0]["positive"] is None and message["findings"][0]["assessed"] is False
    assert message["intended_use"]["within"] is False
    assert message["intended_use"]["ood_score"] == 9.1 and message["intended_use"]["age_checked"] is False
    # P = 0.99 with an urgent threshold of 0.5: urgent if it were assessed, routine as it is not.
    assert result.priority == "routine" and result.urgency(0.5) == "routine"
    jsonschema.validate(message, load_schema("result-v1"))

    within = ScanResult.of(make_analysis([0.01, 0.99]), message_id=MESSAGE_ID, priority="urgent")
    message = json.loads(within.payload)
    assert message["decision"] == {"label": "PNEUMONIA", "positive": True}
    assert message["findings"][0]["assessed"] is True
    assert message["intended_use"] == {"within": True, "reasons": [], "age_checked": False}
    jsonschema.validate(message, load_schema("result-v1"))


def test_the_schema_refuses_a_decision_without_an_assessment_being_possible() -> None:
    """``decision`` and ``positive`` must be present (null or a value), and the verdict is required."""
    message = json.loads(_outside_result().payload)
    schema = load_schema("result-v1")
    for broken in (
        {k: v for k, v in message.items() if k != "decision"},
        {k: v for k, v in message.items() if k != "intended_use"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


# -- the reports say "not assessed" ------------------------------------------------------------


@pytest.fixture(scope="module")
def source(shared_data: Path) -> pydicom.Dataset:
    return pydicom.dcmread(shared_data / RG1, stop_before_pixels=True)


def _located(result: ScanResult, source: pydicom.Dataset) -> ScanResult:
    """The result as the service builds it for this DICOM source (its UIDs in the input)."""
    metadata = {
        "study_instance_uid": str(source.StudyInstanceUID),
        "series_instance_uid": str(source.SeriesInstanceUID),
        "sop_instance_uid": str(source.SOPInstanceUID),
        "sop_class_uid": str(source.SOPClassUID),
    }
    analysis = make_analysis([0.01, 0.99], metadata=metadata, intended_use=result.intended_use)
    return ScanResult.of(analysis, message_id=MESSAGE_ID, priority="routine")


def test_sr_and_fhir_say_not_assessed_with_the_reasons_and_no_probability(
    source: pydicom.Dataset, tmp_path: Path
) -> None:
    result = _located(_outside_result(), source)
    sr = build_sr(result, source, uid_root="2.25")
    summary = sr_summary(sr)
    assert summary["present"] is None and summary["assessed"] is False
    assert summary["probability"] is None and summary["threshold"] is None
    assert summary["comment"].startswith("Not assessed: outside the model's intended use (image unlike")

    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    done = subprocess.run(
        [dcmtk("dsrdump"), "+Pl", str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0 and "E:" not in done.stderr, done.stderr
    assert '(373068000,SCT,"Undetermined")' in done.stdout
    assert "Not assessed: outside the model's intended use" in done.stdout
    assert "Probability" not in done.stdout
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is not None:
        checked = subprocess.run(
            [dciodvfy, str(path)], capture_output=True, text=True, check=False, timeout=60
        )
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        assert errors == []

    bundle = fhir_from_sr(sr, result)
    observations = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    report = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert [o["interpretation"][0]["coding"][0]["code"] for o in observations] == ["IND"]
    assert all(c["code"]["coding"][0]["code"] != "122157" for o in observations for c in o["component"])
    assert "not assessed: outside the model's intended use (image unlike" in report["conclusion"]
    assert "present" not in report["conclusion"] and "URGENT" not in report["conclusion"]


# -- the score -----------------------------------------------------------------------------------


def test_the_score_is_the_sum_of_the_stages_standardised_distances_and_survives_a_round_trip(
    tmp_path: Path,
) -> None:
    """Fitted on one Gaussian sample: its own rows score low, shifted rows high; save/load is exact."""
    from edge_runtime.errors import ModelBundleError
    from edge_runtime.ood import load, save

    rng = np.random.default_rng(26)
    dims = [3, 5]
    train = rng.normal(size=(400, 8))
    layers, start = [], 0
    for dim in dims:
        part = train[:, start : start + dim]
        layers.append((part.mean(axis=0), np.cov(part, rowvar=False)))
        start += dim
    model = OodModel.fit(layers, train)
    rows = np.vstack([train[:5], train[:5] + 4.0])
    by_stage = model.layers[0].standardised(rows[:, :3]) + model.layers[1].standardised(rows[:, 3:])
    np.testing.assert_allclose(model.score(rows), by_stage, rtol=1e-12)
    assert model.score(rows[5:]).min() > model.score(rows[:5]).max()
    # Standardised on training: the training rows' per-stage logs have mean 0 and spread 1.
    assert abs(float(model.layers[0].standardised(train[:, :3]).mean())) < 1e-9

    restored = load(save(model, tmp_path / "ood.npz"), dims)
    np.testing.assert_array_equal(restored.score(rows), model.score(rows))
    with pytest.raises(ModelBundleError, match="widths"):
        load(tmp_path / "ood.npz", [8])
    with pytest.raises(ValueError, match="columns"):
        model.score(np.zeros((1, 7)))


# -- end to end: the bundled model, the real service, real Mosquitto ------------------------------


def test_out_of_scope_scans_get_no_decision_on_any_channel_and_children_do(
    shared_data: Path, default_bundle: Path, mosquitto, subscriber_factory, tmp_path: Path
) -> None:
    """An adult DICOM (045Y), an adult NIH PNG and a rotated child, beside a child's CR and JPEG.

    Urgent threshold 0: every assessed positive is urgent, so an out-of-scope scan on the
    priority topic would show. Out of scope: ``decision`` null, never urgent, SR Undetermined
    and FHIR IND with the reasons; the children get their answers.
    """
    import cv2

    from edge_runtime.bundle import load_bundle
    from edge_runtime.service import EdgeService
    from tests.helpers import chest_dicom_from_jpeg, drop, reports_service_config

    manifest = load_bundle(default_bundle).manifest
    if manifest.intended_use.ood is None or manifest.intended_use.age_years is None:
        pytest.fail("the bundled model must state an age range and carry an OOD check (issue 26)")
    child_jpeg = shared_data / "cxr/kermany_pneumonia_224/test/PNEUMONIA/person1_virus_6.jpeg"
    work = tmp_path / "made"
    work.mkdir()
    child_cr = chest_dicom_from_jpeg(child_jpeg, work / "child.dcm")
    adult_cr = chest_dicom_from_jpeg(child_jpeg, work / "adult.dcm")
    ds = pydicom.dcmread(adult_cr)
    ds.PatientAge = "045Y"
    ds.save_as(adult_cr, enforce_file_format=True)
    rotated = work / "rotated.png"
    cv2.imwrite(str(rotated), np.rot90(cv2.imread(str(child_jpeg), cv2.IMREAD_GRAYSCALE)))
    files = {
        "child.dcm": (child_cr, True),
        "child.jpeg": (child_jpeg, True),
        "adult.dcm": (adult_cr, False),
        "nih.png": (shared_data / "cxr/nih_chestxray14_1024_subset/images/00000075_000.png", False),
        "rotated.png": (rotated, False),
    }
    config = reports_service_config(tmp_path, mosquitto, default_bundle, Reports={"UrgentThreshold": 0.0})
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    service = EdgeService(config)
    service.start()
    try:
        assert service.mqtt is not None and service.mqtt.wait_connected(10)
        for name, (src, _) in files.items():
            drop(src, config.inbox.path, name)
        sub.wait_for(lambda ps: len([p for p in ps if p.get("message_type") == "result"]) >= len(files), 120)
        time.sleep(1.0)
    finally:
        service.stop()
    results = {r["input"]["sha256"]: r for r in sub.results()}
    urgent = {r["message_id"] for r in sub.urgent}
    schema = load_schema("result-v1")
    for name, (src, within) in files.items():
        result = results[hashlib.sha256(src.read_bytes()).hexdigest()]
        jsonschema.validate(result, schema)
        verdict = result["intended_use"]
        assert verdict["within"] is within, (name, verdict)
        if within:
            assert result["decision"] is not None and result["findings"][0]["assessed"] is True
            continue
        assert result["decision"] is None and result["findings"][0]["positive"] is None, name
        assert result["priority"] == "routine" and result["message_id"] not in urgent, name
        assert verdict["reasons"], name
        if name == "adult.dcm":
            assert verdict["age_checked"] and any("age" in r for r in verdict["reasons"])
            text = json.dumps(result)
            assert "045Y" not in text and "patient_age" not in text and "age_source" not in text
            folder = config.reports_path / result["reports"]["folder"]
            sr = sr_summary(pydicom.dcmread(folder / result["reports"]["sr"]["file"]))
            assert sr["present"] is None and sr["comment"].startswith("Not assessed")
            fhir = json.loads((folder / result["reports"]["fhir"]).read_text())
            report = next(
                e["resource"] for e in fhir["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
            )
            assert "not assessed: outside the model's intended use" in report["conclusion"]
            assert "heatmap_png" not in result["reports"]
    # The children's positive answers reach the priority topic (threshold 0), the others do not.
    assert urgent <= {r["message_id"] for r in results.values() if r["intended_use"]["within"]}
