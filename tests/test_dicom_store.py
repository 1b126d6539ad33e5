"""The PACS sink's send() against real DICOM receivers: dcmtk's storescp, and a pynetdicom SCP.

send() reads the files an outbox row names from the result's report folder and C-STOREs them in
one association; the PACS's success (or warning) status is the confirmation (None returned).
A PACS that cannot be reached, rejects the association or answers a failure status, and a
report file that cannot be read, are each a PublishError (the drainer retries; nothing is lost).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from helpers import StoreScp, free_port
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from edge_runtime.config import RuntimeConfig
from edge_runtime.errors import PublishError
from edge_runtime.journal import OutboxMessage
from edge_runtime.sinks.dicom_store import DicomStoreSink

OUR_AE = "EDGEBOX"
FOLDER = "a" * 64  # a result's report folder is named by its message id


def config_for(tmp_path: Path, port: int, ae_title: str = "PACS") -> RuntimeConfig:
    return RuntimeConfig.from_mapping(
        {
            "Dicom": {
                "AeTitle": OUR_AE,
                "Store": {"Host": "127.0.0.1", "Port": port, "AeTitle": ae_title, "TimeoutSeconds": 5},
            },
            "Reports": {"Path": str(tmp_path / "reports")},
            "Journal": {"Path": str(tmp_path / "state" / "journal.sqlite3")},
        }
    )


def secondary_capture(path: Path, level: int, study: str) -> pydicom.Dataset:
    """A small Secondary Capture (as the heat-map object is) of one grey ``level``, written to ``path``."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientName, ds.PatientID = "TEST^PATIENT", "ID1"
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((16, 16), level, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def row_for(config: RuntimeConfig, *names: str) -> tuple[OutboxMessage, list[pydicom.Dataset]]:
    """Report objects ``names`` in the result's folder, and the outbox row that names them."""
    study = generate_uid()
    folder = config.reports_path / FOLDER
    datasets = [secondary_capture(folder / name, 40 * (i + 1), study) for i, name in enumerate(names)]
    node = config.dicom.store
    payload = json.dumps({"folder": FOLDER, "files": list(names)})
    message = OutboxMessage(7, FOLDER, f"{node.ae_title}@{node.host}:{node.port}", payload, 1, "dicom-store")
    return message, datasets


@pytest.fixture()
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    pacs = StoreScp(tmp_path / "pacs", free_port())
    pacs.start()
    yield pacs
    pacs.stop()


class PynetdicomPacs:
    """A pynetdicom Storage SCP answering each C-STORE with ``status`` (called AE title checked)."""

    def __init__(self, status: int) -> None:
        from pynetdicom import AE, evt

        self.status = status
        self.received: list[tuple[str, str]] = []  # (SOP Instance UID, calling AE title)
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.require_called_aet = True
        ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.received.append((str(event.request.AffectedSOPInstanceUID), event.assoc.requestor.ae_title))
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def pynetdicom_pacs() -> Iterator:
    servers: list[PynetdicomPacs] = []

    def start(status: int = 0x0000) -> PynetdicomPacs:
        server = PynetdicomPacs(status)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_send_stores_every_object_of_the_row_at_the_pacs(tmp_path: Path, storescp: StoreScp) -> None:
    config = config_for(tmp_path, storescp.port)
    message, datasets = row_for(config, "heatmap.dcm", "overlay.dcm")
    sink = DicomStoreSink(config)
    assert sink.ready()  # nothing to connect: one association per result

    assert sink.send(message) is None  # the PACS's status is the confirmation

    stored = storescp.stored()
    assert sorted(ds.SOPInstanceUID for ds in stored) == sorted(ds.SOPInstanceUID for ds in datasets)
    by_uid = {ds.SOPInstanceUID: ds for ds in stored}
    for sent in datasets:
        received = by_uid[sent.SOPInstanceUID]
        assert received.StudyInstanceUID == sent.StudyInstanceUID
        assert received.PixelData == sent.PixelData
        assert received.file_meta.SourceApplicationEntityTitle.strip() == OUR_AE  # called as our AE


def test_success_and_warning_statuses_confirm_and_each_file_goes_in_row_order(
    tmp_path: Path, pynetdicom_pacs
) -> None:
    for status in (0x0000, 0xB000):  # success; a warning (e.g. coercion of data elements) is stored too
        pacs = pynetdicom_pacs(status)
        config = config_for(tmp_path / f"{status:04x}", pacs.port)
        message, datasets = row_for(config, "first.dcm", "second.dcm")

        assert DicomStoreSink(config).send(message) is None

        assert pacs.received == [(ds.SOPInstanceUID, OUR_AE) for ds in datasets]


def test_a_failure_status_is_a_publish_error_naming_the_file_and_status(
    tmp_path: Path, pynetdicom_pacs
) -> None:
    pacs = pynetdicom_pacs(0xA700)  # out of resources
    config = config_for(tmp_path, pacs.port)
    message, datasets = row_for(config, "heatmap.dcm", "sr-like.dcm")

    with pytest.raises(PublishError) as refused:
        DicomStoreSink(config).send(message)

    assert "did not store heatmap.dcm" in refused.value.message
    assert "(status 0xA700)" in refused.value.message
    assert f"PACS PACS at 127.0.0.1:{pacs.port}" in refused.value.message
    assert [uid for uid, _ in pacs.received] == [datasets[0].SOPInstanceUID]  # stopped at the first


def test_a_pacs_that_rejects_our_association_is_a_publish_error(tmp_path: Path, pynetdicom_pacs) -> None:
    pacs = pynetdicom_pacs()
    config = config_for(tmp_path, pacs.port, ae_title="NOT-THE-PACS")  # the SCP checks its called AE
    message, _ = row_for(config, "heatmap.dcm")

    with pytest.raises(PublishError) as refused:
        DicomStoreSink(config).send(message)

    assert "rejected the association" in refused.value.message
    assert "Dicom.Store" in refused.value.action and repr(OUR_AE) in refused.value.action
    assert pacs.received == []


def test_a_pacs_that_cannot_be_reached_is_a_publish_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    config = config_for(tmp_path, port)
    message, _ = row_for(config, "heatmap.dcm")

    with pytest.raises(PublishError) as refused:
        DicomStoreSink(config).send(message)

    assert refused.value.message == f"PACS PACS at 127.0.0.1:{port} could not be reached"


def test_a_report_file_that_cannot_be_read_is_a_publish_error_before_any_association(
    tmp_path: Path, storescp: StoreScp
) -> None:
    config = config_for(tmp_path, storescp.port)
    message, _ = row_for(config, "heatmap.dcm")
    (config.reports_path / FOLDER / "heatmap.dcm").write_bytes(b"not DICOM at all")
    missing = OutboxMessage(
        8, FOLDER, message.topic, json.dumps({"folder": FOLDER, "files": ["gone.dcm"]}), 1
    )

    for broken in (message, missing):
        with pytest.raises(PublishError) as refused:
            DicomStoreSink(config).send(broken)
        assert "cannot be read" in refused.value.message
        assert "Reports.Path" in refused.value.action

    assert storescp.stored() == []
