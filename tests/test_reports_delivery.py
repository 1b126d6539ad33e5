"""Reports reach every sink once: SR to a real PACS (dcmtk storescp), FHIR to a FHIR endpoint and
its MQTT topic, urgent results on the priority topic; through outages and restarts."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import cv2
import jsonschema
import pydicom
import pytest
from helpers import (
    NORMAL_JPEG,
    PNEUMONIA_JPEG,
    StoreScp,
    chest_dicom_from_jpeg,
    dcmtk,
    free_port,
    wait_for_port,
)
from helpers import reports_service_config as make_config

from edge_runtime.config import RuntimeConfig
from edge_runtime.results import load_schema
from edge_runtime.service import EdgeService

RESULT_VALIDATOR = jsonschema.Draft202012Validator(load_schema("result-v1"))
#: A chest CR (PA) the bundled model's intended use admits.


def drop(src: Path, inbox: Path, name: str) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    part = inbox / f"{name}.part"
    shutil.copyfile(src, part)
    part.rename(inbox / name)


def test_urgent_positive_is_also_on_the_priority_topic(
    shared_data, default_bundle, mosquitto, subscriber_factory, tmp_path
):
    config = make_config(tmp_path, mosquitto, default_bundle)
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    service = EdgeService(config)
    service.start()
    try:
        drop(shared_data / NORMAL_JPEG, config.inbox.path, "a.jpeg")
        drop(shared_data / PNEUMONIA_JPEG, config.inbox.path, "b.jpeg")
        sub.wait_for(lambda ps: len([p for p in ps if p.get("message_type") == "result"]) >= 2)
        results = sub.results()
        for result in results:
            RESULT_VALIDATOR.validate(result)
        urgent = [r for r in results if r["priority"] == "urgent"]
        routine = [r for r in results if r["priority"] == "routine"]
        assert [r["findings"][0]["positive"] for r in urgent] == [True]
        assert [r["findings"][0]["positive"] for r in routine] == [False]
        # The priority topic carries the urgent one only, the same message (same id).
        assert [m["message_id"] for m in sub.wait_for_list("urgent", 1)] == [urgent[0]["message_id"]]
        time.sleep(0.5)
        assert len(sub.urgent) == 1
        # A PNG/JPEG has no study: no SR or FHIR for it.
        assert sub.fhir == []
        assert all("sr" not in (r.get("reports") or {}) for r in results)
    finally:
        service.stop()


class FhirEndpoint(http.server.ThreadingHTTPServer):
    """A FHIR server's transaction endpoint: validates each Bundle with fhir.resources and keeps it.

    No FHIR server runs here (they are Java services); this one answers the way
    one does (a transaction-response Bundle, or an OperationOutcome when told to fail).
    """

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.authorizations: list[str | None] = []
        self.fail_next = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.authorizations.append(self.headers.get("Authorization"))
                if outer.fail_next > 0:
                    outer.fail_next -= 1
                    self._reply(
                        503,
                        {
                            "resourceType": "OperationOutcome",
                            "issue": [
                                {
                                    "severity": "error",
                                    "code": "transient",
                                    "diagnostics": "database restarting",
                                }
                            ],
                        },
                    )
                    return
                from fhir.resources.bundle import Bundle

                bundle = Bundle.model_validate_json(body)
                outer.received.append(json.loads(body))
                entries = [{"response": {"status": "200 OK"}} for _ in bundle.entry or []]
                self._reply(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries})

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def _wait(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_study_sent_by_storescu_reaches_mqtt_pacs_fhir_once_with_heatmap_and_priority(
    shared_data, default_bundle, mosquitto, subscriber_factory, tmp_path
):
    """The issue's "done when": storescu -> result, SR at a real PACS, FHIR, heat-map, urgent first;
    the PACS is down at first and the FHIR server fails twice; a restart sends nothing again."""
    pacs_port, scp_port = free_port(), free_port()
    pacs = StoreScp(tmp_path / "pacs", pacs_port)
    fhir = FhirEndpoint()
    fhir.fail_next = 2  # the FHIR server answers 503 twice: retried, delivered once
    config = make_config(
        tmp_path,
        mosquitto,
        default_bundle,
        Dicom={
            "Enabled": True,
            "BindAddress": "127.0.0.1",
            "Port": scp_port,
            "SpoolPath": str(tmp_path / "spool"),
            "Store": {"Host": "127.0.0.1", "Port": pacs_port, "AeTitle": "PACS", "TimeoutSeconds": 5},
        },
        Reports={"FhirEndpoint": fhir.url},
    )
    studies = {
        # Children's CRs: within the model's intended use, so both get decisions and heat-maps.
        "normal": chest_dicom_from_jpeg(shared_data / NORMAL_JPEG, tmp_path / "normal.dcm"),
        "pneumonia": chest_dicom_from_jpeg(shared_data / PNEUMONIA_JPEG, tmp_path / "pneumonia.dcm"),
    }
    sources = {name: pydicom.dcmread(path, stop_before_pixels=True) for name, path in studies.items()}
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    service = EdgeService(config)
    service.start()
    try:
        wait_for_port(scp_port)
        sent = subprocess.run(
            [dcmtk("storescu"), "-aet", "MODALITY", "-aec", config.dicom.ae_title, "127.0.0.1", str(scp_port)]
            + [str(p) for p in studies.values()],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        sub.wait_for(lambda ps: len([p for p in ps if p.get("message_type") == "result"]) >= 2)
        by_sop = {r["input"]["sop_instance_uid"]: r for r in sub.results()}
        results = {name: by_sop[str(ds.SOPInstanceUID)] for name, ds in sources.items()}
        for result in results.values():
            RESULT_VALIDATOR.validate(result)
            assert "error" not in result["reports"], result["reports"]
        assert results["pneumonia"]["priority"] == "urgent" and results["normal"]["priority"] == "routine"
        # Urgent first: the positive is on the priority topic too, the other is not.
        urgent = sub.wait_for_list("urgent", 1)
        assert [u["message_id"] for u in urgent] == [results["pneumonia"]["message_id"]]
        for name, result in results.items():
            reports, source = result["reports"], sources[name]
            folder = config.reports_path / reports["folder"]
            sr = pydicom.dcmread(folder / reports["sr"]["file"])
            assert sr.SOPInstanceUID == reports["sr"]["sop_instance_uid"]
            assert sr.StudyInstanceUID == source.StudyInstanceUID
            dump = subprocess.run(
                [dcmtk("dsrdump"), str(folder / "sr.dcm")], capture_output=True, text=True, check=True
            ).stdout
            assert "NOT FOR DIAGNOSTIC USE" in dump.upper()
            assert ("Urgent" in dump) == (name == "pneumonia")
            # The heat-map: a PNG and a Secondary Capture that the SR references.
            png = cv2.imread(str(folder / reports["heatmap_png"]))
            assert png is not None and png.ndim == 3
            heat = pydicom.dcmread(folder / reports["heatmap_dicom"]["file"])
            assert heat.SOPInstanceUID == reports["heatmap_dicom"]["sop_instance_uid"]
            assert heat.StudyInstanceUID == source.StudyInstanceUID
            assert str(heat.SOPInstanceUID) in str(sr)  # the SR references it
        # FHIR on its topic: the bundles that were written, without the patient's identifiers.
        bundles = sub.wait_for_list("fhir", 2)
        written = [
            json.loads((config.reports_path / r["reports"]["folder"] / "fhir.json").read_text())
            for r in results.values()
        ]
        assert sorted(map(json.dumps, bundles)) == sorted(map(json.dumps, written))
        text = json.dumps(bundles)
        for identifier in ("DOE", "MRN123456", "20190101", str(sources["normal"].get("PatientID") or "DOE")):
            assert identifier not in text
        # The PACS was down: the SRs and heat-maps wait in the outbox, then go once it is up.
        assert len(service.journal.pending_messages("dicom-store")) == 2
        pacs.start()
        expected = {
            r["reports"][k]["sop_instance_uid"] for r in results.values() for k in ("sr", "heatmap_dicom")
        }
        _wait(
            lambda: {str(d.SOPInstanceUID) for d in pacs.stored()} == expected,
            what="SR and heat-maps at the PACS",
        )
        _wait(lambda: len(fhir.received) == 2, what="the FHIR bundles at the server")
        assert sorted(map(json.dumps, fhir.received)) == sorted(map(json.dumps, written))
    finally:
        service.stop()
    # A restart sends nothing again (everything was confirmed).
    service = EdgeService(config)
    service.start()
    try:
        time.sleep(2.0)
        assert len(fhir.received) == 2 and len(sub.results()) == 2 and len(sub.fhir) == 2
        assert len(sub.urgent) == 1
    finally:
        service.stop()
        pacs.stop()
        fhir.close()
    assert len(pacs.stored()) == 4  # each object stored once


def test_old_report_folders_go_once_every_sink_has_them(tmp_path):
    from edge_runtime.reports.retention import prune_reports

    now = time.time()
    root = tmp_path / "reports"
    ages = {"a" * 64: 40, "b" * 64: 40, "c" * 64: 5}  # days
    for name, days in ages.items():
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "sr.dcm").write_bytes(b"x")
        old = now - days * 86400
        os.utime(folder, (old, old))
    # "b" is old but its PACS row is still undelivered: kept; "c" is recent: kept.
    assert prune_reports(root, 30, {"b" * 64}, now=now) == 1
    assert sorted(p.name for p in root.iterdir()) == ["b" * 64, "c" * 64]
    assert prune_reports(root, 0, set(), now=now) == 0  # KeepDays 0: kept for ever
    assert len(list(root.iterdir())) == 2


def test_fhir_sink_sends_the_bearer_token_and_names_an_unreadable_token_file(tmp_path):
    from edge_runtime.errors import PublishError
    from edge_runtime.journal import OutboxMessage
    from edge_runtime.sinks.fhir_http import FhirHttpSink

    fhir = FhirEndpoint()
    try:
        token = tmp_path / "fhir.token"
        token.write_text("s3cret-token\n")
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
        message = OutboxMessage(1, "m" * 64, fhir.url, json.dumps(bundle), 1, "fhir-http")

        def sink(token_file: Path) -> FhirHttpSink:
            return FhirHttpSink(
                RuntimeConfig.from_mapping(
                    {"Reports": {"FhirEndpoint": fhir.url, "FhirTokenFile": str(token_file)}}
                )
            )

        assert sink(token).send(message) is None  # the server's 200 is the confirmation
        assert fhir.authorizations == ["Bearer s3cret-token"]
        with pytest.raises(PublishError) as refused:
            sink(tmp_path / "missing.token").send(message)
        assert "Reports.FhirTokenFile" in refused.value.action and "missing.token" in refused.value.message
        assert len(fhir.received) == 1  # nothing sent without the token
    finally:
        fhir.close()
