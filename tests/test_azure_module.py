"""The runtime as an Azure IoT Edge module, with the unmodified azure-iot-device client.

The far end is :class:`edgehub.FakeEdgeHub`: Mosquitto with TLS on 127.0.0.1:8883,
the workload API on a unix socket (trust bundle, SAS signing) and a router that
answers twin and method requests the way edgeHub does. What is checked is the
issue's list: start from the IoT Edge environment, configuration from the twin
(initial, live patch, invalid patch refused and reported), reported properties,
direct methods, results on edgeHub outputs exactly once across an edgeHub outage
and a module crash, and a SAS token renewed before it expires.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgehub import AZURE_SDK_WARNING_FILTERS, FakeEdgeHub, collect_sdk_garbage, edgehub_or_skip
from helpers import TEST_PUBLIC_KEY, chest_dicom_from_jpeg, make_tiny_bundle

from edge_runtime.azure_edge import EdgeHubModule, merge_patch, resolve_device_id, twin_safe
from edge_runtime.journal import Journal
from edge_runtime.remote_methods import METHODS
from edge_runtime.service import EdgeService
from edge_runtime.sinks import create_sinks
from edge_runtime.sinks.cloud import CLOUD_INPUT_FIELDS

REPO = Path(__file__).resolve().parents[1]
#: The client warns on every reconnect (paho's old callback API, a socket paho leaves open).
pytestmark = [pytest.mark.filterwarnings(f) for f in AZURE_SDK_WARNING_FILTERS]


@pytest.fixture(autouse=True)
def _sdk_garbage_collected_here() -> Iterator[None]:
    """The SDK's leftover sockets are collected after each test here, not during a later one."""
    yield
    collect_sdk_garbage()


NORMAL = "cxr/kermany_pneumonia_224/test/NORMAL"


def twin_desired(tmp_path: Path, bundle: Path) -> dict[str, Any]:
    """Desired properties as the generated manifest writes them, with this test's paths."""
    return {
        "Inbox": {
            "Path": str(tmp_path / "inbox"),
            "QuarantinePath": str(tmp_path / "q"),
            "SettleSeconds": 0.2,
            "RescanIntervalSeconds": 0.5,
        },
        "Model": {
            "BundlePath": str(bundle),
            "Backend": "onnxruntime",
            "Threshold": "",
            "TrustedKeys": [TEST_PUBLIC_KEY.read_text()],
            "RequireSignature": True,
        },
        "Mqtt": {"Enabled": False, "ClientId": "edge-runtime-{deviceId}"},
        "Journal": {"Path": str(tmp_path / "state" / "journal.sqlite3")},
        "Health": {"HeartbeatSeconds": 1, "File": str(tmp_path / "state" / "health.json")},
        "Reports": {"Path": str(tmp_path / "reports")},
        "Azure": {"StatusEverySeconds": 0, "FhirOutput": "fhir"},
        "Workers": 1,
    }


def drop(src: Path, inbox: Path, name: str) -> None:
    part = inbox / f"{name}.part"
    part.write_bytes(src.read_bytes())
    part.rename(inbox / name)


def scans(shared_data: Path, n: int) -> list[Path]:
    found = sorted((shared_data / NORMAL).glob("*.jpeg"))[:n]
    if len(found) < n:
        pytest.skip(f"{shared_data / NORMAL} has fewer than {n} JPEGs")
    return found


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    bundle = make_tiny_bundle(tmp_path / "model-0.0.1", conformance=True)
    hub = edgehub_or_skip(tmp_path / "hub", desired=twin_desired(tmp_path, bundle))
    for key, value in hub.environ().items():
        monkeypatch.setenv(key, value)
    # Reconnect quickly after the outage the tests cause (the SDK waits 10 s by default).
    monkeypatch.setenv("EDGE_RUNTIME_EDGEHUB_RETRY_SECONDS", "1")
    yield hub
    hub.stop()
    # Nothing the module sent would have been refused by IoT Hub (twin rules, payload limits).
    assert hub.refusals == []


def start_module_service() -> EdgeService:
    """The module as `edge-runtime run` builds it under IoT Edge (environment already set)."""
    module = EdgeHubModule()
    try:
        module.connect(timeout_s=20)
        service = EdgeService(module.load_config(), host=module)
    except BaseException:
        module.close()
        raise
    service.start()
    return service


@pytest.fixture()
def module_service(hub: FakeEdgeHub) -> Any:
    service = start_module_service()
    yield hub, service
    service.stop()


def results_on(hub: FakeEdgeHub, output: str = "results") -> list[dict[str, Any]]:
    return [json.loads(m.body) for m in hub.outputs_on(output)]


# -- the pieces, without a hub -------------------------------------------------------------


def test_twin_patches_merge_as_iot_hub_merges_them() -> None:
    desired = {"Model": {"Threshold": 0.5, "Backend": "onnxruntime"}, "Workers": 1}
    merge_patch(desired, {"$version": 4, "Model": {"Threshold": None, "Threads": 2}, "Workers": 2})
    assert desired == {"Model": {"Backend": "onnxruntime", "Threads": 2}, "Workers": 2}
    resolved = resolve_device_id({"Mqtt": {"ClientId": "edge-runtime-{deviceId}"}}, "box-7")
    assert resolved["Mqtt"]["ClientId"] == "edge-runtime-box-7"
    # Reported property names may not hold '.', '$' or spaces; tuples become lists.
    assert twin_safe({"a.b": {"$c d": (1, 2)}}) == {"a_b": {"_c_d": [1, 2]}}


class _TwinClient:
    """Just enough of the SDK client for the twin logic: a twin to read, handlers to hold."""

    connected = True
    on_connection_state_change = None
    on_twin_desired_properties_patch_received: Any = None

    def __init__(self, desired: dict[str, Any]) -> None:
        self.desired = desired
        self.reads = 0

    def get_twin(self) -> dict[str, Any]:
        self.reads += 1
        return {"desired": json.loads(json.dumps(self.desired)), "reported": {"$version": 1}}

    def shutdown(self) -> None:
        pass


def test_every_desired_patch_reads_the_whole_twin_in_order() -> None:
    """After a reconnect the SDK hands the whole desired document over as if it were a patch, and it
    calls handlers on a pool of threads: merging patches could keep a key deleted meanwhile, or apply
    two out of order. The module reads the twin whole, on one thread, after each patch."""
    client = _TwinClient({"$version": 3, "Workers": 2, "Model": {"Threshold": 0.7}})
    module = EdgeHubModule(client, environ={"IOTEDGE_DEVICEID": "box-9"})
    module.read_twin()
    applied: list[float | None] = []
    module.subscribe_to_config_updates(lambda: applied.append(module.load_config().model.threshold))
    handler = client.on_twin_desired_properties_patch_received
    try:
        deadline = time.monotonic() + 5
        while client.reads < 2 and time.monotonic() < deadline:  # the read right after subscribing
            time.sleep(0.01)
        assert applied == []  # same version: nothing to apply
        client.desired = {"$version": 7, "Model": {"Threshold": 0.6}}  # Workers deleted at version 5
        handler({"$version": 7, "Model": {"Threshold": 0.6}})
        while not applied and time.monotonic() < deadline:
            time.sleep(0.01)
        config = module.load_config()
        assert config.workers == 0 and config.model.threshold == 0.6 and applied == [0.6]
    finally:
        module.close()


def test_only_the_host_that_started_us_gets_sinks(tmp_path: Path) -> None:
    from edge_runtime.config import RuntimeConfig

    class FakeClient:
        connected = False
        on_connection_state_change = None

    module = EdgeHubModule(FakeClient(), environ={})
    config = RuntimeConfig.from_mapping({"Mqtt": {"Enabled": False}, "Azure": {"FhirOutput": "fhir"}})
    names = [s.name for s in create_sinks(config, module)]
    assert names == ["edgehub", "edgehub-urgent", "edgehub-fhir"]
    assert not [s for s in create_sinks(config, None) if s.name.startswith(("edgehub", "ipc-"))]
    # With MQTT off the results output is the results channel (its backlog holds new scans).
    assert [getattr(s, "primary", False) for s in create_sinks(config, module)] == [True, True, False]


# -- with the fake edgeHub and the real client ---------------------------------------------------


def test_starts_from_the_edge_environment_reports_and_sends_deidentified_results(
    shared_data: Path, module_service: Any
) -> None:
    hub, service = module_service
    assert service.config.inbox.path.name == "inbox"  # from the twin, not the defaults
    assert service.config.mqtt.client_id == "edge-runtime-box-1"
    # The SAS token was signed by the workload API for this module and generation.
    assert hub.sign_requests and {(r.module_id, r.generation_id) for r in hub.sign_requests} == {
        ("HealthDiagEdgeInference", "gen-1")
    }
    hub.wait_for(lambda: "runtime" in hub.reported and "status" in hub.reported, what="reported status")
    assert hub.reported["status"]["model"]["version"] == "0.0.1"
    assert hub.reported["status"]["model"]["conformance"]["passed"] is True
    (jpeg,) = scans(shared_data, 1)
    # A DICOM, so that the result has reports (SR, FHIR, heat-map) as well.
    dicom = chest_dicom_from_jpeg(jpeg, service.config.inbox.path.parent / "chest.dcm")
    drop(dicom, service.config.inbox.path, "chest.dcm")
    hub.wait_for(lambda: len(hub.outputs_on("results")) == 1, what="one result on the results output")
    (message,) = hub.outputs_on("results")
    body = json.loads(message.body)
    assert message.properties["$.mid"] == body["message_id"]
    assert message.properties.get("$.ct") == "application/json"
    # De-identified: whatever the routes say, nothing identifying leaves through this output.
    assert set(body["input"]) <= set(CLOUD_INPUT_FIELDS)
    assert "chest.dcm" not in message.body.decode()
    # The FHIR Bundle goes to its own output, as written beside the SR.
    hub.wait_for(lambda: len(hub.outputs_on("fhir")) == 1, what="the FHIR report on the fhir output")
    fhir = hub.outputs_on("fhir")[0]
    assert json.loads(fhir.body)["resourceType"] == "Bundle"
    assert fhir.properties["$.mid"] == body["message_id"]
    hub.wait_for(lambda: service.journal.counts()["outbox_pending"] == 0, what="outbox drained")
    # Urgent results again on their own output (as on the MQTT priority topic), and only those.
    urgent = [json.loads(m.body)["message_id"] for m in hub.outputs_on("urgent")]
    assert body["priority"] == "urgent"  # the tiny model finds pneumonia in this bright image
    assert urgent == [body["message_id"]]


def test_twin_patches_apply_live_and_an_invalid_one_is_refused_and_reported(
    shared_data: Path, module_service: Any
) -> None:
    hub, service = module_service
    version = hub.patch_desired({"Model": {"Threshold": 0.9}})
    hub.wait_for(lambda: service.config.model.threshold == 0.9, what="threshold applied live")
    hub.wait_for(
        lambda: hub.reported.get("configuration", {}).get("desiredVersion") == version,
        what="the outcome reported",
    )
    assert hub.reported["configuration"]["status"] == "applied"
    assert hub.reported["configuration"]["changed"] == "Model.Threshold"
    # Invalid: refused, the running configuration stays, and the twin says which setting and why.
    bad = hub.patch_desired({"Mqtt": {"Qos": 7}})
    hub.wait_for(
        lambda: hub.reported.get("configuration", {}).get("desiredVersion") == bad,
        what="the refusal reported",
    )
    assert hub.reported["configuration"]["status"] == "rejected"
    assert "Mqtt.Qos" in hub.reported["configuration"]["error"]
    assert service.config.mqtt.qos == 1 and service.config.model.threshold == 0.9
    # A setting bound at start: applied to the twin's record, and the twin says it needs a restart.
    later = hub.patch_desired({"Mqtt": {"Qos": 1}, "Workers": 2})
    hub.wait_for(
        lambda: hub.reported.get("configuration", {}).get("desiredVersion") == later,
        what="the restart-needing outcome",
    )
    assert hub.reported["configuration"]["needsRestart"] == "Workers"
    # Scans keep flowing with the live threshold.
    (jpeg,) = scans(shared_data, 1)
    drop(jpeg, service.config.inbox.path, "after.jpeg")
    hub.wait_for(lambda: len(hub.outputs_on("results")) == 1, what="a result after the patches")
    assert json.loads(hub.outputs_on("results")[0].body)["findings"][0]["threshold"] == 0.9


def test_patches_in_quick_succession_end_on_the_latest(module_service: Any) -> None:
    hub, service = module_service
    versions = [hub.patch_desired({"Model": {"Threshold": t}}) for t in (0.1, 0.2, 0.3, 0.4, 0.5)]
    hub.wait_for(
        lambda: hub.reported.get("configuration", {}).get("desiredVersion") == versions[-1],
        what="the last version reported",
    )
    assert service.config.model.threshold == 0.5
    assert hub.reported["configuration"]["status"] == "applied"


def test_an_invalid_twin_at_start_is_reported_and_the_module_exits(hub: FakeEdgeHub, tmp_path: Path) -> None:
    version = hub.patch_desired({"Mqtt": {"Qos": 7}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME__")}
    env.update(hub.environ())
    done = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "Mqtt.Qos" in done.stderr
    configuration = hub.reported["configuration"]
    assert configuration["status"] == "rejected" and configuration["desiredVersion"] == version
    assert "Mqtt.Qos" in configuration["error"]


def test_a_model_folder_not_there_yet_is_waited_for_not_refused(
    module_service: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layered rollout may change Model.BundlePath before the model module has copied the bundle."""
    import edge_runtime.service

    monkeypatch.setattr(edge_runtime.service, "BUNDLE_RETRY_S", 0.3)
    hub, service = module_service
    folder = tmp_path / "models" / "pneumonia-cxr-0.0.2"
    version = hub.patch_desired({"Model": {"BundlePath": str(folder)}})
    hub.wait_for(
        lambda: hub.reported.get("configuration", {}).get("desiredVersion") == version,
        what="the wait reported",
    )
    assert hub.reported["configuration"]["status"] == "waiting"
    assert "does not exist yet" in hub.reported["configuration"]["waiting"]
    assert service.analyzer.bundle.version == "0.0.1"
    # The model module copies to a temporary name, then renames: the folder appears whole.
    make_tiny_bundle(tmp_path / "models" / ".copying", version="0.0.2")
    (tmp_path / "models" / ".copying").rename(folder)
    hub.wait_for(lambda: service.analyzer.bundle.version == "0.0.2", what="the new model taken")
    hub.wait_for(lambda: hub.reported["configuration"]["status"] == "applied", what="applied reported")


def test_direct_methods_answer_read_only(module_service: Any) -> None:
    hub, _service = module_service
    status, health = hub.call_method("health")
    assert status == 200 and health["state"] == "online", health["reason"]
    assert health["model"]["version"] == "0.0.1"
    assert "last_error" not in health and "last_error_code" in health  # no scan reference
    status, verify = hub.call_method("model.verify", {})
    assert status == 200 and verify["passed"] is True and "report" in verify
    status, journal = hub.call_method("journal.check")
    assert status == 200 and journal["healthy"] is True
    status, refused = hub.call_method("quarantine.retry", {"file": "x"})
    assert status == 405 and "read-only" in refused["error"]
    status, unknown = hub.call_method("reboot-the-pacs")
    assert status == 404 and set(unknown["methods"]) == set(METHODS)
    status, _bad = hub.call_method("model.verify", [1, 2])
    assert status == 400


def test_results_reach_edgehub_exactly_once_across_an_outage(shared_data: Path, module_service: Any) -> None:
    hub, service = module_service
    hub.wait_for(lambda: service.host is not None and service.host.connected, what="connected")
    hub.stop_broker()
    hub.wait_for(lambda: not service.host.connected, what="the module noticing the outage")
    snapshot = service.health.snapshot()
    assert snapshot["state"] == "degraded" and "edgeHub not reachable" in snapshot["reason"]
    for i, jpeg in enumerate(scans(shared_data, 3)):
        drop(jpeg, service.config.inbox.path, f"during-{i}.jpeg")
    hub.wait_for(lambda: service.counters["processed"] == 3, what="3 scans processed during the outage")
    assert service.journal.results_awaiting_delivery() == 3
    assert not hub.outputs_on("results")
    hub.start_broker()
    hub.wait_for(lambda: len(hub.outputs_on("results")) >= 3, timeout=40, what="3 results after the outage")
    hub.wait_for(lambda: service.journal.counts()["outbox_pending"] == 0, what="outbox drained")
    time.sleep(1.0)  # anything sent twice would have arrived by now
    ids = [m.properties["$.mid"] for m in hub.outputs_on("results")]
    assert len(ids) == 3 and len(set(ids)) == 3, Counter(ids)
    # The twin says so once edgeHub is back.
    hub.wait_for(lambda: hub.reported.get("status", {}).get("state") == "online", what="online again")
    assert {json.loads(m.body)["message_id"] for m in hub.outputs_on("results")} == set(ids)


@pytest.mark.parametrize("ttl", [125])
def test_sas_token_is_renewed_before_it_expires(
    shared_data: Path, hub: FakeEdgeHub, monkeypatch: pytest.MonkeyPatch, ttl: int
) -> None:
    # The SDK renews 120 s before expiry: a 125 s token is renewed after about 5 s.
    monkeypatch.setenv("EDGE_RUNTIME_SAS_TOKEN_TTL_SECONDS", str(ttl))
    service = start_module_service()
    module = service.host
    assert isinstance(module, EdgeHubModule)
    try:
        first = hub.sign_requests[0]
        assert first.expiry - first.at <= ttl + 2
        hub.wait_for(lambda: len(hub.sign_requests) >= 2, timeout=30, what="a second signature (renewal)")
        second = hub.sign_requests[1]
        assert second.expiry > first.expiry and second.at < first.expiry
        hub.wait_for(lambda: module.connected, what="connected with the renewed token")
        (jpeg,) = scans(shared_data, 1)
        drop(jpeg, service.config.inbox.path, "after-renewal.jpeg")
        hub.wait_for(lambda: len(hub.outputs_on("results")) == 1, what="a result after the renewal")
    finally:
        service.stop()


def test_a_crashed_module_restarts_and_sends_every_result_once(
    shared_data: Path, hub: FakeEdgeHub, tmp_path: Path
) -> None:
    """``edge-runtime run`` as edgeAgent starts it (no --config), killed -9 with results waiting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME__")}
    env.update(hub.environ(), EDGE_RUNTIME_EDGEHUB_RETRY_SECONDS="1")
    command = [sys.executable, "-m", "edge_runtime.cli", "run"]
    health_file = tmp_path / "state" / "health.json"

    def processed() -> int:
        try:
            return int(json.loads(health_file.read_text())["counters"]["processed"])
        except (OSError, ValueError, KeyError):
            return -1

    log = (tmp_path / "module.log").open("ab")
    first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    jpegs = scans(shared_data, 5)
    try:
        hub.wait_for(lambda: "runtime" in hub.reported, timeout=60, what="the module reporting running")
        for i, jpeg in enumerate(jpegs[:2]):
            drop(jpeg, tmp_path / "inbox", f"scan-{i}.jpeg")
        hub.wait_for(lambda: len(hub.outputs_on("results")) == 2, timeout=60, what="the first two results")
        # edgeHub goes away; three more results wait in the journal; then the module dies.
        hub.stop_broker()
        for i, jpeg in enumerate(jpegs[2:], start=2):
            drop(jpeg, tmp_path / "inbox", f"scan-{i}.jpeg")
        hub.wait_for(lambda: processed() == 5, timeout=60, what="five scans processed (health file)")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        hub.start_broker()
        connects = hub.connects
        second = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            hub.wait_for(
                lambda: len(hub.outputs_on("results")) >= len(jpegs),
                timeout=90,
                what="every result after the restart",
            )
            hub.wait_for(lambda: json.loads(health_file.read_text())["counters"]["outbox_pending"] == 0)
            time.sleep(1.5)  # anything sent twice would have arrived by now
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert hub.connects > connects
    ids = [m.properties["$.mid"] for m in hub.outputs_on("results")]
    assert len(ids) == len(jpegs) and len(set(ids)) == len(jpegs), Counter(ids)
    journal = Journal(tmp_path / "state" / "journal.sqlite3")
    try:
        assert journal.results_awaiting_delivery() == 0
        assert journal.counts()["done"] == len(jpegs)
    finally:
        journal.close()
