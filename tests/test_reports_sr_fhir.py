"""DICOM SR and FHIR reports of a real result, checked by the tools hospitals use.

The source is a real chest CR from ``../shared/data/dicom`` (pydicom's RG1,
which carries a patient name, ID and birth date) and the result is what the
bundled model computes on it (``ScanAnalyzer``). The SR must be read by
dcmtk's ``dsrdump``, pass ``dciodvfy`` where dicom3tools is installed, and be
accepted by dcmtk's ``storescp`` and stored unchanged; the FHIR Bundle must
validate with ``fhir.resources`` (R5), say what the SR says, and carry nothing
that names the patient.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fhir.resources import get_fhir_model_class
from helpers import dcmtk, free_port, wait_for_port
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage

from edge_runtime.errors import ReportSourceError
from edge_runtime.reports.fhir import MESSAGE_ID_SYSTEM, fhir_from_sr
from edge_runtime.reports.sr import (
    CAUTION,
    MANUFACTURER,
    build_sr,
    finding_code,
    sr_summary,
)
from edge_runtime.reports.uids import derived_uid
from edge_runtime.results import ScanResult, analysis_of

RG1 = "dicom/pydicom_data/RG1_UNCR.dcm"
LEGACY_CR = "dicom/fo_dicom_via_dcmfx/CR-MONO1-10-chest.dcm"
ROOT = "2.25"
_INPUT_FIELDS = ("kind", "file_name", "sha256", "decoder")


def _num(dump: str, concept: str) -> float:
    """The value dsrdump shows for the NUM item ``concept`` (printed with ``+Pc``), unit UCUM 1."""
    shown = re.search(re.escape(f"NUM:{concept}=") + r'"([0-9.eE+-]+)" \(1,UCUM,"no units"\)', dump)
    assert shown is not None, f"no {concept} in dsrdump output"
    return float(shown.group(1))


def _bytes(ds: Dataset) -> bytes:
    """The dataset encoded in Explicit VR Little Endian, without file meta: its content."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def source(shared_data: Path) -> Dataset:
    return pydicom.dcmread(shared_data / RG1, stop_before_pixels=True)


@pytest.fixture(scope="module")
def analysed(shared_data: Path, default_bundle: Path) -> dict[str, Any]:
    """The bundled model's real result on the RG1 chest radiograph."""
    from edge_runtime.pipeline import ScanAnalyzer

    analyzer = ScanAnalyzer.from_bundle_path(default_bundle, "onnxruntime")
    try:
        raw = analyzer.analyze(shared_data / RG1).result().message()
    finally:
        analyzer.close()
    # RG1 is an adult's film (outside the model's intended use: no decision). These tests are
    # about how a decided result is written, so it is decided here as within it.
    return _at_threshold(raw, raw["findings"][0]["threshold"])


def _at_threshold(result: dict[str, Any], threshold: float) -> dict[str, Any]:
    """The same scan and model output decided at another operating point (analysis_of, as the box does)."""
    p = result["probabilities"]
    labels = list(p)
    analysis = analysis_of(
        file_name=result["input"]["file_name"],
        sha256=result["input"]["sha256"],
        kind=result["input"]["kind"],
        decoder=result["input"]["decoder"],
        metadata={
            k: v for k, v in result["input"].items() if k not in ("kind", "file_name", "sha256", "decoder")
        },
        model=result["model"],
        labels=labels,
        probabilities=np.array([p[label] for label in labels]),
        positive_label=result["findings"][0]["label"],
        threshold=threshold,
        timings_ms=result["timings_ms"],
    )
    return ScanResult.of(analysis, message_id=result["message_id"], priority="routine").message()


def _typed(result: dict[str, Any], *, urgent: bool = False) -> ScanResult:
    """The message as the runtime's typed result, with the priority the test asks for."""
    return ScanResult.model_validate(dict(result, priority="urgent" if urgent else "routine"))


@pytest.fixture(scope="module")
def positive(analysed: dict[str, Any]) -> dict[str, Any]:
    return _at_threshold(analysed, min(analysed["findings"][0]["probability"], 0.5))


@pytest.fixture(scope="module")
def negative(analysed: dict[str, Any]) -> dict[str, Any]:
    result = _at_threshold(analysed, 1.0)
    assert not result["findings"][0]["positive"], "the model output P = 1.0 exactly: no negative to test"
    return result


@pytest.fixture(scope="module")
def heatmap(shared_data: Path, source: Dataset, analysed: dict[str, Any]) -> Dataset:
    """A real Secondary Capture of the radiograph (as the heat-map module makes one), to reference."""
    pixels = pydicom.dcmread(shared_data / RG1).pixel_array.astype(np.float32)
    small = pixels[::8, ::8]
    grey = ((small - small.min()) / max(float(np.ptp(small)), 1.0) * 255).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    reference = copy.deepcopy(source)
    reference.ReferringPhysicianName = f"{source.ReferringPhysicianName}^"  # else highdicom warns, quoting it
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derived_uid(ROOT, analysed["message_id"], "heatmap-series"),
        series_number=9902,
        sop_instance_uid=derived_uid(ROOT, analysed["message_id"], "heatmap-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
    )


# -- the SR ------------------------------------------------------------------------------------


def test_the_sr_says_what_the_result_says(analysed: dict[str, Any], source: Dataset) -> None:
    sr = build_sr(_typed(analysed, urgent=False), source, uid_root=ROOT)
    summary = sr_summary(sr)
    finding = analysed["findings"][0]
    assert summary["finding"] == {"scheme": "SCT", "code": "233604007", "meaning": "Pneumonia"}
    assert summary["present"] is finding["positive"]
    assert summary["probability"] == pytest.approx(finding["probability"], abs=1e-9)
    assert summary["threshold"] == pytest.approx(finding["threshold"], abs=1e-9)
    model = analysed["model"]
    assert summary["model"] == {
        "name": model["name"],
        "version": model["version"],
        "sha256": model["sha256"],
        "manufacturer": MANUFACTURER,
    }
    assert summary["urgent"] is False
    assert summary["caution"] == CAUTION
    assert summary["preliminary"] is True
    assert summary["study_instance_uid"] == source.StudyInstanceUID
    assert summary["sop_instance_uid"] == derived_uid(ROOT, analysed["message_id"], "sr-instance")
    assert summary["series_instance_uid"] == derived_uid(ROOT, analysed["message_id"], "sr-series")
    # Filed with the image it describes: same patient and study, source listed as evidence.
    assert (sr.PatientID, sr.PatientName, sr.StudyInstanceUID) == (
        source.PatientID,
        source.PatientName,
        source.StudyInstanceUID,
    )
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == source.SeriesInstanceUID
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sr.Modality == "SR" and sr.VerificationFlag == "UNVERIFIED"
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription


@pytest.mark.parametrize("urgent", [True, False])
def test_dsrdump_reads_the_sr_with_finding_probability_model_and_caution(
    positive: dict[str, Any], negative: dict[str, Any], source: Dataset, tmp_path: Path, urgent: bool
) -> None:
    dsrdump = dcmtk("dsrdump")
    result = positive if urgent else negative
    path = _write(build_sr(_typed(result, urgent=urgent), source, uid_root=ROOT), tmp_path / "sr.dcm")
    done = subprocess.run(
        [dsrdump, "+Pc", str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "E:" not in done.stderr and "W:" not in done.stderr, done.stderr
    text = done.stdout
    finding = result["findings"][0]
    value = '(52101004,SCT,"Present")' if finding["positive"] else '(272519000,SCT,"Absent")'
    assert f'CODE:(233604007,SCT,"Pneumonia")={value}' in text
    assert _num(text, '(122157,DCM,"Probability")') == pytest.approx(finding["probability"], abs=1e-9)
    assert _num(text, '(122411,DCM,"Threshold Value")') == pytest.approx(finding["threshold"], abs=1e-9)
    assert result["model"]["name"] in text and result["model"]["version"] in text
    assert "NOT FOR DIAGNOSTIC USE" in text
    assert ('(103391001,SCT,"Urgent")' in text) is urgent
    assert ('(50811001,SCT,"Routine")' in text) is not urgent


def test_dciodvfy_finds_no_error_in_the_sr(analysed: dict[str, Any], source: Dataset, tmp_path: Path) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
    path = _write(build_sr(_typed(analysed, urgent=True), source, uid_root=ROOT), tmp_path / "sr.dcm")
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], done.stderr
    assert "Comprehensive3DSR" in done.stdout + done.stderr


def test_a_real_scp_accepts_the_sr_and_stores_it_unchanged(
    analysed: dict[str, Any], source: Dataset, tmp_path: Path
) -> None:
    storescp = dcmtk("storescp")
    store = tmp_path / "pacs"
    store.mkdir()
    port = free_port()
    log = (tmp_path / "storescp.log").open("wb")
    scp = subprocess.Popen(
        [storescp, "--aetitle", "PACS", "--output-directory", str(store), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port)
        sr = build_sr(_typed(analysed, urgent=True), source, uid_root=ROOT)
        ae = AE(ae_title="EDGE")
        ae.add_requested_context(Comprehensive3DSRStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(sr)
        finally:
            assoc.release()
        assert status.Status == 0x0000
        deadline = time.monotonic() + 10
        while not list(store.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scp.terminate()
        scp.wait(timeout=10)
        log.close()
    (stored_path,) = list(store.iterdir())
    stored = pydicom.dcmread(stored_path)
    assert stored.SOPInstanceUID == sr.SOPInstanceUID
    assert stored.file_meta.MediaStorageSOPClassUID == Comprehensive3DSRStorage
    assert _bytes(stored) == _bytes(sr)
    assert sr_summary(stored) == sr_summary(sr)


def test_the_same_result_gives_the_same_sr_and_fhir_bytes(analysed: dict[str, Any], source: Dataset) -> None:
    first = build_sr(_typed(analysed, urgent=True), source, uid_root=ROOT)
    time.sleep(0.01)  # highdicom stamps the wall clock; build_sr must overwrite every stamp
    second = build_sr(_typed(analysed, urgent=True), source, uid_root=ROOT)
    assert _bytes(first) == _bytes(second)
    assert fhir_from_sr(first, _typed(analysed)) == fhir_from_sr(second, _typed(analysed))
    other_root = build_sr(_typed(analysed, urgent=True), source, uid_root="1.2.826.0.1.3680043.10.1234")
    assert other_root.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.1234.")
    assert len(other_root.SOPInstanceUID) <= 64


def test_the_source_header_is_not_changed(analysed: dict[str, Any], shared_data: Path) -> None:
    source = pydicom.dcmread(shared_data / RG1, stop_before_pixels=True)
    before = _bytes(source)
    build_sr(_typed(analysed, urgent=False), source, uid_root=ROOT)
    assert _bytes(source) == before


def test_a_legacy_header_without_patient_id_or_birth_date_still_gets_an_sr(
    shared_data: Path, analysed: dict[str, Any], tmp_path: Path
) -> None:
    dsrdump = dcmtk("dsrdump")
    legacy = pydicom.dcmread(shared_data / LEGACY_CR, stop_before_pixels=True, force=True)
    assert "PatientID" not in legacy and "PatientBirthDate" not in legacy
    result = dict(analysed, input=dict(analysed["input"], sop_instance_uid=str(legacy.SOPInstanceUID)))
    sr = build_sr(_typed(result, urgent=False), legacy, uid_root=ROOT)
    assert sr.PatientID == "" and sr.StudyInstanceUID == legacy.StudyInstanceUID
    path = _write(sr, tmp_path / "sr.dcm")
    done = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_header_without_uids_is_a_report_error_naming_what_is_missing(
    analysed: dict[str, Any], source: Dataset
) -> None:
    broken = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
        setattr(broken, keyword, source.get(keyword))
    with pytest.raises(ReportSourceError, match="StudyInstanceUID, SeriesInstanceUID") as info:
        build_sr(_typed(analysed, urgent=False), broken, uid_root=ROOT)
    assert info.value.code == "report_source_invalid" and "modality" in info.value.action


def _corpus(shared_data: Path) -> list[str]:
    rows = (shared_data / "dicom" / "INVENTORY.tsv").read_text().splitlines()[1:]
    return [row.split("\t")[0] for row in rows]


def test_every_dicom_header_of_the_corpus_gets_an_sr_and_fhir(
    shared_data: Path, analysed: dict[str, Any]
) -> None:
    """Legacy, de-identified, MR/CT/SC headers: no crash and no warning (warnings are errors here)."""
    for name in _corpus(shared_data):
        header = pydicom.dcmread(shared_data / "dicom" / name, stop_before_pixels=True, force=True)
        sr = build_sr(_typed(analysed, urgent=False), header, uid_root=ROOT)
        summary = sr_summary(sr)
        assert summary["study_instance_uid"] == header.StudyInstanceUID, name
        (observation,) = _resources(fhir_from_sr(sr, _typed(analysed)), "Observation")
        assert observation["partOf"][0]["identifier"]["value"] == f"urn:oid:{header.StudyInstanceUID}"


def test_labels_without_a_snomed_concept_use_the_private_scheme() -> None:
    assert finding_code("PNEUMONIA").value == "233604007"
    code = finding_code("EFFUSION")
    assert (code.value, code.scheme_designator) == ("EFFUSION", "99HDIAG")


# -- FHIR --------------------------------------------------------------------------------------


def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _component(observation: dict[str, Any], code: str) -> dict[str, Any]:
    (component,) = [c for c in observation["component"] if c["code"]["coding"][0]["code"] == code]
    return component


@pytest.mark.parametrize("urgent", [True, False])
def test_fhir_from_the_sr_validates_and_says_what_the_sr_says(
    positive: dict[str, Any], negative: dict[str, Any], source: Dataset, tmp_path: Path, urgent: bool
) -> None:
    result = positive if urgent else negative
    path = _write(build_sr(_typed(result, urgent=urgent), source, uid_root=ROOT), tmp_path / "sr.dcm")
    sr = pydicom.dcmread(path)  # mapped from the stored SR, as a PACS-side converter would
    bundle = fhir_from_sr(sr, _typed(result))
    get_fhir_model_class("Bundle").model_validate(bundle)
    summary = sr_summary(sr)

    assert bundle["type"] == "transaction"
    assert all(e["request"]["method"] == "PUT" for e in bundle["entry"])
    assert all(
        e["request"]["url"] == f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle["entry"]
    )
    (observation,) = _resources(bundle, "Observation")
    (report,) = _resources(bundle, "DiagnosticReport")
    (device,) = _resources(bundle, "Device")

    coding = observation["code"]["coding"][0]
    assert (coding["system"], coding["code"]) == ("http://snomed.info/sct", summary["finding"]["code"])
    present = observation["valueCodeableConcept"]["coding"][0]["code"] == "52101004"
    assert present is summary["present"] is result["findings"][0]["positive"]
    assert observation["interpretation"][0]["coding"][0]["code"] == ("POS" if present else "NEG")
    assert _component(observation, "122157")["valueQuantity"]["value"] == summary["probability"]
    assert _component(observation, "122411")["valueQuantity"]["value"] == summary["threshold"]
    priority = _component(observation, "260870009")["valueCodeableConcept"]["coding"][0]["code"]
    assert (priority == "103391001") is urgent is summary["urgent"]
    tags = [t["code"] for t in report.get("meta", {}).get("tag", [])]
    assert (tags == ["UR"]) is urgent
    assert observation["identifier"][0]["value"] == f"urn:oid:{summary['observation_uid']}"
    assert observation["bodySite"]["coding"][0]["code"] == "39607008"
    assert observation["status"] == report["status"] == "preliminary"
    assert observation["note"][0]["text"] == summary["caution"]

    study = f"urn:oid:{sr.StudyInstanceUID}"
    assert observation["partOf"][0]["identifier"]["value"] == study
    assert report["study"][0]["identifier"] == {
        "type": observation["partOf"][0]["identifier"]["type"],
        "system": "urn:dicom:uid",
        "value": study,
    }
    assert {"system": MESSAGE_ID_SYSTEM, "value": result["message_id"]} in report["identifier"]
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{sr.SOPInstanceUID}"} in report["identifier"]
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["result"] == [{"reference": f"Observation/{observation['id']}"}]
    assert "NOT FOR DIAGNOSTIC USE" in report["conclusion"]
    assert ("URGENT" in report["conclusion"]) is urgent

    assert observation["device"] == {"reference": f"Device/{device['id']}"}
    assert device["displayName"] == summary["model"]["name"]
    assert device["version"] == [{"value": summary["model"]["version"]}]
    assert device["manufacturer"] == MANUFACTURER
    assert f"sha256={summary['model']['sha256']}" in [p["valueString"] for p in device["property"]]
    assert all(r["id"].startswith(result["message_id"][:40]) for r in [observation, report])


def test_fhir_carries_no_patient_identifier(
    analysed: dict[str, Any], source: Dataset, heatmap: Dataset
) -> None:
    sr = build_sr(_typed(analysed, urgent=True), source, uid_root=ROOT, heatmap=heatmap)
    text = json.dumps(fhir_from_sr(sr, _typed(analysed)))
    name = str(source.PatientName)
    for value in (name, *name.split("^"), source.PatientID, source.PatientBirthDate, source.AccessionNumber):
        assert value and value not in text, f"{value!r} leaked into FHIR"
    assert '"subject"' not in text and "Patient" not in text


def test_the_heatmap_is_referenced_by_the_sr_and_the_fhir_report(
    analysed: dict[str, Any], source: Dataset, heatmap: Dataset, tmp_path: Path
) -> None:
    dsrdump = dcmtk("dsrdump")
    sr = build_sr(_typed(analysed, urgent=False), source, uid_root=ROOT, heatmap=heatmap)
    summary = sr_summary(sr)
    assert summary["visual_explanation"] == {
        "sop_class_uid": heatmap.SOPClassUID,
        "sop_instance_uid": heatmap.SOPInstanceUID,
    }
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, heatmap.SOPInstanceUID}
    path = _write(sr, tmp_path / "sr.dcm")
    done = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'IMAGE:(,,"Visual explanation")=(SC image,)' in done.stdout

    bundle = fhir_from_sr(sr, _typed(analysed))
    (selection,) = _resources(bundle, "ImagingSelection")
    (observation,) = _resources(bundle, "Observation")
    assert selection["instance"][0]["uid"] == heatmap.SOPInstanceUID
    assert selection["seriesUid"] == heatmap.SeriesInstanceUID
    assert selection["studyUid"] == source.StudyInstanceUID
    assert observation["derivedFrom"] == [{"reference": f"ImagingSelection/{selection['id']}"}]
