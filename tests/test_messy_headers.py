"""Messy and hostile DICOM headers: reports are still written and valid, and nothing leaks (issue #23).

Real modalities send ``PatientSex U``, ``PatientBirthDate 19510000``,
``StudyTime 10:30:00`` and ``PatientAge 62``; a hostile or careless one puts a
name where a date belongs, or a path where a UID belongs. Each such header
must still yield an SR (passing dciodvfy and dsrdump), a FHIR report and a
heat-map, or be refused with a code; and a name planted in every free-text
and malformed field must appear on no channel that leaves the process: the
results (and urgent, FHIR) topics, the retained status, the health file,
the IoT Core payload, nor in the log. The SR alone carries the patient's own
name and IDs, as every DICOM object about the patient does (it goes to the
hospital's PACS only, see :mod:`edge_runtime.reports.sr`).

The headers come from a real chest CR from ``../shared/data`` (SIIM); the image analysed is a
paediatric chest radiograph (Kermany, as the CR a modality sends), within the bundled model's
intended use, so every report, heat-map included, is built. The service runs for real, with
a real Mosquitto.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pydicom
import pytest
from helpers import PNEUMONIA_JPEG, TEST_TRUSTED_KEYS, chest_dicom_from_jpeg, dcmtk, make_analysis
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from edge_runtime.config import ReportsConfig, RuntimeConfig
from edge_runtime.errors import (
    PUBLIC_TEXTS,
    UNEXPECTED_ERROR,
    EdgeRuntimeError,
    InvalidDicomUid,
    ReportError,
    ReportProcessCrashed,
    public_text,
)
from edge_runtime.health import error_line
from edge_runtime.logs import JsonFormatter, TextFormatter
from edge_runtime.privacy import scrub_header_values
from edge_runtime.reports.header import clean_header
from edge_runtime.reports.writer import ReportWriter, failed_outcome, log_outcome
from edge_runtime.results import Reports, ScanResult, check_uids, load_schema
from edge_runtime.service import EdgeService
from edge_runtime.sinks.greengrass import cloud_payload

SIIM = "dicom/derived/siim_cxr_explicit_le.dcm"
PROBE = "ZZPROBE JOHANNA"
#: What must not leak: the planted name's parts (a PN is written with ^), and the hostile UID.
LEAKS = ("ZZPROBE", "JOHANNA")
BAD_UID = "../../../../tmp/x"
RESULT_VALIDATOR = jsonschema.Draft202012Validator(load_schema("result-v1"))

#: Every free-text field and every malformed one holds the planted name.
PLANTED: dict[str, str] = {
    "PatientName": "ZZPROBE^JOHANNA",
    "PatientID": PROBE,
    "PatientBirthDate": "JOHANNA51",
    "PatientSex": PROBE,
    "PatientAge": "JOHANNA",
    "StudyDate": "ZZPROBE",
    "StudyTime": "ZZPROBE",
    "StudyDescription": f"{PROBE} chest",
    "SeriesDescription": f"{PROBE} PA",
    "InstitutionName": f"{PROBE} clinic",
    "ReferringPhysicianName": "ZZPROBE^JOHANNA^DR",
    "OperatorsName": "ZZPROBE^JOHANNA",
    "AccessionNumber": PROBE,
    "StudyID": "ZZPROBE",
}
#: Quirks real modalities send, each of which used to cost every report.
QUIRKS: dict[str, dict[str, str]] = {
    "birth-date-name": {"PatientBirthDate": "JOHANNA51"},
    "sex-name": {"PatientSex": PROBE},
    "study-date-name": {"StudyDate": "ZZPROBE"},
    "sex-U": {"PatientSex": "U"},
    "partial-birth-date": {"PatientBirthDate": "19510000"},
    "time-with-colons": {"StudyTime": "10:30:00"},
    "age-without-unit": {"PatientAge": "62"},
    "everything-planted": PLANTED,
}


def messy_dicom(src: Path, dst: Path, values: dict[str, str | None]) -> Path:
    """``src`` with ``values`` written as they are (None removes the attribute), a new SOP Instance UID."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    with warnings.catch_warnings():  # pydicom warns about the invalid values we write on purpose
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            tag = tag_for_keyword(keyword)
            assert tag is not None, keyword
            if value is None:
                del ds[tag]
            else:
                ds[tag] = DataElement(tag, dictionary_VR(tag), value)
        if "SOPInstanceUID" in values and values["SOPInstanceUID"] is not None:
            ds.file_meta.MediaStorageSOPInstanceUID = values["SOPInstanceUID"]
        ds.save_as(dst, enforce_file_format=True)
    return dst


def sr_tool_errors(path: Path) -> list[str]:
    """dciodvfy's "Error" lines and dsrdump's failure, for one SR file."""
    problems = []
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False, timeout=60)
    problems += [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    dump = subprocess.run(
        [dcmtk("dsrdump"), str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    if dump.returncode != 0:
        problems.append(f"dsrdump exit {dump.returncode}: {dump.stderr}")
    return problems


def assert_no_leak(text: str, where: str, extra: tuple[str, ...] = ()) -> None:
    for probe in (*LEAKS, *extra):
        assert probe not in text, f"{probe!r} reached {where}"


def formatted(records: list[logging.LogRecord]) -> str:
    """The records as both log formats write them (JSON for Greengrass, text for people)."""
    json_fmt, text_fmt = JsonFormatter(), TextFormatter()
    return "\n".join(f"{json_fmt.format(r)}\n{text_fmt.format(r)}" for r in records)


# -- the normaliser --------------------------------------------------------------------------


def _header(**values: str) -> Dataset:
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            tag = tag_for_keyword(keyword)
            ds[tag] = DataElement(tag, dictionary_VR(tag), value)
    return ds


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("PatientBirthDate", "JOHANNA51", None),
        ("PatientBirthDate", "19510000", None),  # a partial date is not a DA
        ("PatientBirthDate", "19510230", None),  # 30 February
        ("PatientBirthDate", "1951.03.04", "19510304"),  # ACR-NEMA form (PS3.5 DA note)
        ("PatientBirthDate", "19510304", "19510304"),
        ("StudyDate", "ZZPROBE", None),
        ("StudyTime", "10:30:00", "103000"),  # ACR-NEMA form (PS3.5 TM note)
        ("StudyTime", "10:30:00.25", "103000.25"),
        ("StudyTime", "10:30", "1030"),
        ("StudyTime", "253000", None),
        ("StudyTime", "ZZPROBE", None),
        ("StudyTime", "103000.123456", "103000.123456"),
        ("PatientSex", "U", None),  # enumerated values are M, F, O (PS3.3 C.7.1.1)
        ("PatientSex", PROBE, None),
        ("PatientSex", "f", "F"),
        ("PatientSex", "O", "O"),
        ("PatientAge", "62", None),
        ("PatientAge", "062Y", "062Y"),
        ("AccessionNumber", "ZZPROBE JOHANNA 12345", None),  # SH holds 16 characters
        ("InstitutionName", "ZZPROBE\x07clinic", None),  # a control character
        ("StudyDescription", "Chest PA", "Chest PA"),
        ("ReferringPhysicianName", "ZZPROBE^JOHANNA", "ZZPROBE^JOHANNA"),
    ],
)
def test_invalid_values_are_normalised_or_left_out_and_the_fix_names_no_value(
    keyword: str, value: str, expected: str | None
) -> None:
    source = _header(**{keyword: value}, StudyInstanceUID="1.2.3")
    clean, fixes = clean_header(source)
    if expected is None:
        assert keyword not in clean
        assert [(f.keyword, f.change) for f in fixes] == [(keyword, "dropped")]
    else:
        assert str(clean[keyword].value) == expected
        assert [f.keyword for f in fixes] == ([] if expected == value else [keyword])
    for fix in fixes:
        assert value not in str(fix) and "ZZPROBE" not in str(fix)
    assert str(source[keyword].value) == value  # the source is not changed


def test_the_sr_copies_the_patients_own_name_but_no_invalid_value(shared_data: Path) -> None:
    source = pydicom.dcmread(shared_data / SIIM, stop_before_pixels=True)
    assert source.PatientAge == "62"  # the real file's own quirk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in PLANTED.items():
            tag = tag_for_keyword(keyword)
            source[tag] = DataElement(tag, dictionary_VR(tag), value)
    clean, fixes = clean_header(source)
    dropped = {f.keyword for f in fixes if f.change == "dropped"}
    assert dropped == {"PatientBirthDate", "PatientSex", "PatientAge", "StudyDate", "StudyTime"}
    assert str(clean.PatientName) == "ZZPROBE^JOHANNA" and clean.PatientID == PROBE
    assert clean.StudyInstanceUID == source.StudyInstanceUID


def test_exception_text_is_scrubbed_of_header_values() -> None:
    header = _header(PatientName="ZZPROBE^JOHANNA", PatientBirthDate="JOHANNA51", PatientID=PROBE)
    text = "ValueError: Unable to convert 'JOHANNA51' to 'DA' object; 'ZZPROBE JOHANNA'; name ZZPROBE^JOHANNA"
    scrubbed = scrub_header_values(text, header)
    assert_no_leak(scrubbed, "the scrubbed text")
    assert "<PatientBirthDate>" in scrubbed and "<PatientID>" in scrubbed and "<PatientName>" in scrubbed
    assert scrubbed.startswith("ValueError: Unable to convert")


# -- codes and fixed texts ---------------------------------------------------------------------


def _tree(cls: type[EdgeRuntimeError]) -> list[type[EdgeRuntimeError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _tree(sub))]


def test_every_code_has_a_reviewed_fixed_text() -> None:
    for cls in _tree(EdgeRuntimeError):
        text = public_text(cls.code)
        assert text and text != PUBLIC_TEXTS[UNEXPECTED_ERROR] and "{" not in text, cls
    for code in ("report_failed", "report_source_invalid", "report_timeout", "report_process_crashed"):
        assert PUBLIC_TEXTS[code].startswith("reports not written: "), code
    assert public_text("a_code_nobody_defined") == PUBLIC_TEXTS[UNEXPECTED_ERROR]

    class LaterReportError(ReportError):  # a class added later without its own text
        code = "later_report_error"

    assert public_text("later_report_error") == PUBLIC_TEXTS["report_failed"]
    assert error_line("scan-0123", "report_failed") == (
        f"scan-0123: report_failed: {PUBLIC_TEXTS['report_failed']} (details in the service log)"
    )


def test_an_invalid_uid_is_refused_without_quoting_it() -> None:
    check_uids("scan-1.dcm", {"sop_instance_uid": "1.2.840.10008.1", "study_instance_uid": "2.25.1"})
    for bad in (BAD_UID, "1.2.03.4", "1." + "2" * 70, PROBE):
        with pytest.raises(InvalidDicomUid) as info:
            check_uids("scan-1.dcm", {"study_instance_uid": "1.2.3", "sop_instance_uid": bad})
        assert bad not in str(info.value) and "SOPInstanceUID" in str(info.value)
        assert info.value.code == "invalid_dicom_uid"


def test_cloud_payload_rewrites_report_errors_from_their_code() -> None:
    analysis = make_analysis(np.array([0.3, 0.7]), metadata={"sop_instance_uid": "1.2.3", "modality": "CR"})
    # A report error whose text is not the code's own (what an exception's text would be).
    reports = Reports(folder="f" * 64, error=f"reports not written: ValueError: '{PROBE}'")
    result = ScanResult.of(analysis, message_id="f" * 64, priority="urgent", reports=reports)
    cloud = cloud_payload(result)
    assert cloud["reports"] == {
        "folder": "f" * 64,
        "error_code": "report_failed",
        "error": public_text("report_failed"),
    }
    assert_no_leak(json.dumps(cloud), "the IoT Core payload")


# -- reports from messy headers (the real model's result) --------------------------------------


@pytest.fixture(scope="module")
def child_cr(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A child's chest CR (the SIIM film is an adult's: outside the model's intended use)."""
    return chest_dicom_from_jpeg(shared_data / PNEUMONIA_JPEG, tmp_path_factory.mktemp("child") / "child.dcm")


@pytest.fixture(scope="module")
def analysed(child_cr: Path, default_bundle: Path) -> Any:
    from edge_runtime.pipeline import ScanAnalyzer

    analyzer = ScanAnalyzer.from_bundle_path(default_bundle, "onnxruntime")
    try:
        return analyzer.analyze(child_cr, preview_side=256)
    finally:
        analyzer.close()


@pytest.mark.parametrize("case", list(QUIRKS))
def test_each_quirky_header_still_gets_sr_fhir_and_heatmap_that_pass_the_tools(
    case: str, child_cr: Path, analysed: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    values = QUIRKS[case]
    path = messy_dicom(child_cr, tmp_path / f"{case}.dcm", dict(values))
    result = analysed.result()
    writer = ReportWriter(ReportsConfig(), tmp_path / "reports")
    with caplog.at_level(logging.DEBUG):
        outcome = writer.build(result, path.read_bytes(), image=analysed.image, heatmap=analysed.heatmap)
        written = log_outcome(result, outcome)
    assert written is not None and written.error is None, written
    links = written.model_dump(exclude_none=True)
    assert {"sr", "fhir", "heatmap_png", "heatmap_dicom"} <= set(links)
    folder = tmp_path / "reports" / links["folder"]
    assert sr_tool_errors(folder / "sr.dcm") == []
    sr = pydicom.dcmread(folder / "sr.dcm")
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime"):
        value = str(sr.get(keyword, "") or "")
        if keyword in values:
            expected = "103000" if case == "time-with-colons" else ""
            assert value == expected, f"{keyword} {value!r} in the SR"
    assert "PatientAge" not in sr or sr.PatientAge in ("", "062Y")
    assert_no_leak((folder / "fhir.json").read_text(), "the FHIR report")
    sr_text = (folder / "sr.dcm").read_bytes()
    assert b"JOHANNA51" not in sr_text
    if case == "everything-planted":
        assert str(sr.PatientName) == "ZZPROBE^JOHANNA"  # the patient's own name: the SR goes to PACS
    # The log names the fixed attributes, never their values.
    log_text = formatted(caplog.records)
    # (10:30:00 could be a log line's own time of day.)
    assert_no_leak(
        log_text, "the log", extra=tuple(v for v in values.values() if len(v) > 2 and ":" not in v)
    )
    for keyword in values:
        if keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "PatientAge"):
            assert keyword in log_text


def test_a_report_failure_publishes_a_code_and_fixed_text_and_logs_scrubbed_detail(
    child_cr: Path, analysed: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """The defect itself: a library's exception quoting a header value went on the wire verbatim."""
    from edge_runtime.reports import sr as sr_module

    def refuse(result: ScanResult, header: Dataset, **kwargs: Any) -> Dataset:
        raise ValueError(f"Unable to convert {str(header.PatientName)!r} to 'DA' object")

    monkeypatch.setattr(sr_module, "build_sr", refuse)
    path = messy_dicom(child_cr, tmp_path / "in.dcm", dict(PLANTED))
    result = analysed.result()
    with caplog.at_level(logging.DEBUG):
        outcome = ReportWriter(ReportsConfig(), tmp_path / "reports").build(
            result, path.read_bytes(), image=analysed.image, heatmap=analysed.heatmap
        )
        written = log_outcome(result, outcome)
    assert written is not None
    assert written.model_dump(exclude_none=True) == {
        "folder": result.message_id,
        "error": public_text("report_failed"),
        "error_code": "report_failed",
    }
    # The detail for the log: the exception's text, each header value replaced by its keyword.
    assert outcome.detail is not None and outcome.detail.startswith("ValueError: Unable to convert '<")
    log_text = formatted(caplog.records)
    assert_no_leak(log_text, "the log")
    assert "report_failed" in log_text and "Unable to convert '<" in log_text
    RESULT_VALIDATOR.validate(result.with_reports(written, 1.0).message())
    # The report process' own failures carry their codes too.
    crashed = failed_outcome("a" * 64, ReportProcessCrashed("the report process stopped"))
    assert crashed.links is not None and crashed.links["error_code"] == "report_process_crashed"
    assert crashed.links["error"].startswith("reports not written: the report process")


# -- every channel, with the service running for real -----------------------------------------


def test_no_planted_name_or_exception_text_on_any_channel(
    child_cr: Path,
    default_bundle: Path,
    mosquitto,
    subscriber_factory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = RuntimeConfig.from_mapping(
        {
            "Inbox": {
                "Path": str(tmp_path / "inbox"),
                "QuarantinePath": str(tmp_path / "quarantine"),
                "SettleSeconds": 0.2,
                "RescanIntervalSeconds": 0.5,
            },
            "Model": {"BundlePath": str(default_bundle), "TrustedKeys": TEST_TRUSTED_KEYS},
            "Mqtt": {
                "Host": mosquitto.host,
                "Port": mosquitto.port,
                "ClientId": f"edge-{tmp_path.name}",
                "TopicPrefix": f"test/{tmp_path.name}",
            },
            "Journal": {"Path": str(tmp_path / "state" / "journal.sqlite3")},
            "Reports": {"Path": str(tmp_path / "reports")},
            "Health": {"File": str(tmp_path / "state" / "health.json"), "HeartbeatSeconds": 1},
            "Workers": 1,
        }
    )
    inputs = {
        # Every quirk and a planted name in every free-text field: all reports, nothing leaks.
        "messy.dcm": dict(PLANTED, StudyTime="10:30:00"),
        # No Study Instance UID: no report can reference it, the result says so by code only.
        "nostudy.dcm": dict(PLANTED, StudyInstanceUID=None),
        # A path where a UID belongs: refused at intake, nothing published.
        "baduid.dcm": dict(PLANTED, SOPInstanceUID=BAD_UID),
    }
    staged = tmp_path / "staged"
    staged.mkdir()
    files = {name: messy_dicom(child_cr, staged / name, values) for name, values in inputs.items()}
    sources = {name: pydicom.dcmread(p, stop_before_pixels=True) for name, p in files.items()}
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    caplog.set_level(logging.INFO)
    caplog.clear()  # from here on, only what the service logs
    service = EdgeService(config)
    service.start()
    try:
        config.inbox.path.mkdir(parents=True, exist_ok=True)
        for name, path in files.items():
            shutil.copyfile(path, config.inbox.path / f"{name}.part")
            (config.inbox.path / f"{name}.part").rename(config.inbox.path / name)
        sub.wait_for(lambda ps: len([p for p in ps if p.get("message_type") == "result"]) >= 2, timeout_s=60)
        error_file = config.inbox.quarantine_path / "baduid.dcm.error.json"
        deadline = time.monotonic() + 30
        while not error_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        sub.wait_for_list("fhir", 1)
        time.sleep(1.5)  # a heartbeat: status and health file with the last error
    finally:
        service.stop()
    results = {r["input"]["sop_instance_uid"]: r for r in sub.results()}
    assert len(results) == 2
    messy = results[str(sources["messy.dcm"].SOPInstanceUID)]
    nostudy = results[str(sources["nostudy.dcm"].SOPInstanceUID)]
    for result in (messy, nostudy):
        RESULT_VALIDATOR.validate(result)

    # The quirky header got every report, and the SR passes the tools.
    assert {"sr", "fhir", "heatmap_png", "heatmap_dicom"} <= set(messy["reports"]), messy["reports"]
    folder = config.reports_path / messy["reports"]["folder"]
    assert sr_tool_errors(folder / "sr.dcm") == []
    sr = pydicom.dcmread(folder / "sr.dcm")
    assert sr.StudyTime == "103000" and sr.PatientBirthDate == "" and sr.PatientSex == ""
    # No study UID: a code and its fixed text, nothing else.
    assert nostudy["reports"] == {
        "folder": nostudy["message_id"],
        "error_code": "report_source_invalid",
        "error": public_text("report_source_invalid"),
    }
    # The hostile UID: quarantined with its code, never published.
    error = json.loads(error_file.read_text())
    assert error["code"] == "invalid_dicom_uid" and BAD_UID not in error["error"]
    assert BAD_UID not in json.dumps(list(results.values()))

    # Every message on MQTT: results, urgent, FHIR, the retained status.
    assert sub.fhir
    wire = json.dumps([m[1] for m in sub.messages] + sub.urgent + sub.fhir)
    assert_no_leak(wire, "MQTT", extra=(BAD_UID, "ValueError", "Traceback"))
    statuses = [p for _, p, _ in sub.messages if p.get("message_type") == "status"]
    errors = [s["last_error"] for s in statuses if "last_error" in s]
    assert any("report_source_invalid" in e for e in errors) and any("invalid_dicom_uid" in e for e in errors)
    # The health file and the IoT Core payload.
    health = (config.health.file).read_text()
    assert_no_leak(health, "the health file", extra=(BAD_UID,))
    assert json.loads(health)["last_error"]
    for result in results.values():
        cloud = cloud_payload(ScanResult.model_validate(result))
        assert_no_leak(json.dumps(cloud), "the IoT Core payload", extra=(BAD_UID,))
    # The log: the fixes by attribute name, no header value (UIDs are logged as identifiers).
    log_text = formatted(caplog.records)
    assert_no_leak(log_text, "the log")
    assert "PatientBirthDate dropped" in log_text and "StudyTime normalised" in log_text
