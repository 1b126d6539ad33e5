"""Reports are built from the header the decoder read, never from the scan file opened again.

The decoder child reads a scan once, checks those bytes against the hash it was admitted
under and decodes them; the report child used to open the file by path for the header of the
SR, the Secondary Capture and FHIR. A file replaced in between (another patient's image under
the same name) would then have had its header written into reports about the first image.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from helpers import PNEUMONIA_JPEG, TEST_TRUSTED_KEYS, chest_dicom_from_jpeg

from edge_runtime.config import RuntimeConfig
from edge_runtime.files import read_scan
from edge_runtime.pipeline import ScanAnalyzer
from edge_runtime.reports.processes import ReportProcesses
from edge_runtime.results import ScanResult

CHEST = "dicom/derived/siim_cxr_explicit_le.dcm"
DEFLATED = "dicom/derived/siim_cxr_deflated_le.dcm"
J2K = "dicom/pydicom_data/RG1_J2KR.dcm"


@pytest.fixture(scope="module")
def analyzer(default_bundle: Path):
    analyzer = ScanAnalyzer.from_bundle_path(default_bundle, isolate=True)  # the service's decoder child
    yield analyzer
    analyzer.close()


def _admit(path: Path, config: RuntimeConfig):
    return read_scan(path, config.inbox)


@pytest.mark.parametrize("name", [CHEST, J2K, DEFLATED])
def test_the_header_handed_on_is_the_decoded_files_own_up_to_its_pixels(
    name: str, shared_data: Path, analyzer: ScanAnalyzer, tmp_path: Path
) -> None:
    source = shared_data / name
    config = RuntimeConfig.from_mapping({"Journal": {"Path": str(tmp_path / "state" / "j.sqlite3")}})
    scan = _admit(source, config)
    outcome = analyzer.analyze(source, scan.sha256, scan=scan)
    data = source.read_bytes()
    assert outcome.header is not None and data.startswith(outcome.header)
    deflated = name == DEFLATED
    # Up to the pixel data (a few KB), except a deflated data set: all of it (its offsets are inflated).
    assert (len(outcome.header) == len(data)) if deflated else (len(outcome.header) < 64 * 1024)
    ours = pydicom.dcmread(io.BytesIO(outcome.header), stop_before_pixels=True)
    theirs = pydicom.dcmread(source, stop_before_pixels=True)
    assert ours == theirs


def test_a_scan_replaced_after_decoding_does_not_lend_its_header_to_the_reports(
    shared_data: Path, analyzer: ScanAnalyzer, tmp_path: Path
) -> None:
    config = RuntimeConfig.from_mapping(
        {
            "Journal": {"Path": str(tmp_path / "state" / "journal.sqlite3")},
            "Model": {"TrustedKeys": TEST_TRUSTED_KEYS},
        }
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    first, other = inbox / "scan.dcm", tmp_path / "other.dcm"
    # A child's CR (within the model's intended use: its reports include the heat-map).
    ds = pydicom.dcmread(chest_dicom_from_jpeg(shared_data / PNEUMONIA_JPEG, tmp_path / "child.dcm"))
    ds.PatientName, ds.PatientID = "First^Patient", "FIRST-1"
    ds.save_as(first, enforce_file_format=True)
    ds.PatientName, ds.PatientID = "Second^Patient", "SECOND-2"
    ds.save_as(other, enforce_file_format=True)

    scan = _admit(first, config)
    outcome = analyzer.analyze(first, scan.sha256, scan=scan)
    os.replace(other, first)  # another patient's image under the name, after the decode
    reports = ReportProcesses(1)  # the service's report child
    try:
        written = reports.write(
            config, outcome.result(), outcome.header, image=outcome.image, heatmap=outcome.heatmap
        )
    finally:
        reports.close()
    assert written is not None and written.error is None, written
    folder = config.reports_path / written.folder
    for report in ("sr.dcm", "heatmap.dcm"):
        written = pydicom.dcmread(folder / report)
        assert (str(written.PatientName), written.PatientID) == ("First^Patient", "FIRST-1"), report
    assert "SECOND-2" not in (folder / "fhir.json").read_text()
    first.unlink()  # gone altogether: the reports need nothing from it
    result = ScanResult.of(outcome.analysis, message_id="f" * 64, priority="routine")
    again = ReportProcesses(1)
    try:
        written = again.write(config, result, outcome.header, image=outcome.image, heatmap=outcome.heatmap)
    finally:
        again.close()
    assert written is not None and written.error is None and written.sr is not None, written
