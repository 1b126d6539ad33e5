"""The fake edgeHub (tests/edgehub.py) against the real, unmodified azure-iot-device client.

Why: the IoT Edge module's integration tests trust this fake to speak edgeHub's protocol. If the
fake drifted from what the SDK publishes and expects (topics, property encoding, twin versions,
SAS signing, sessions across an outage), those tests would pass against a hub that does not
exist. Each test here drives the SDK exactly as a module does and checks both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests_unixsocket
from azure.iot.device import IoTHubModuleClient, Message, MethodRequest, MethodResponse
from azure.iot.device.exceptions import ConnectionFailedError
from edgehub import AZURE_SDK_WARNING_FILTERS, FakeEdgeHub, collect_sdk_garbage, edgehub_or_skip

pytestmark = [pytest.mark.filterwarnings(f) for f in AZURE_SDK_WARNING_FILTERS]


@pytest.fixture(autouse=True)
def _sdk_garbage_collected_here() -> Iterator[None]:
    """The SDK's leftover sockets are collected after each test here, not during a later one."""
    yield
    collect_sdk_garbage()


DESIRED = {"threshold": 0.5, "labels": {"effusion": True, "nodule": True}}
ClientFactory = Callable[..., IoTHubModuleClient]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeEdgeHub]:
    """A running fake edgeHub whose Mosquitto is gone after the test, whatever happened."""
    edgehub = edgehub_or_skip(tmp_path, desired=DESIRED)
    try:
        yield edgehub
    finally:
        edgehub.stop()


@pytest.fixture
def make_client(hub: FakeEdgeHub, monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientFactory]:
    """Create module clients from the edge environment, as a module does; all shut down afterwards."""
    for name, value in hub.environ().items():
        monkeypatch.setenv(name, value)
    clients: list[IoTHubModuleClient] = []

    def make(**kwargs: Any) -> IoTHubModuleClient:
        client = IoTHubModuleClient.create_from_edge_environment(**kwargs)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.shutdown()


def test_twin_get_and_reported_patch(hub: FakeEdgeHub, make_client: ClientFactory) -> None:
    client = make_client()
    client.connect()
    assert hub.connects == 1

    twin = client.get_twin()
    assert twin == {"desired": {**DESIRED, "$version": 1}, "reported": {"$version": 1}}

    client.patch_twin_reported_properties({"status": "ready", "model": {"name": "cxr", "version": 3}})
    client.patch_twin_reported_properties({"model": {"version": 4}, "status": None})
    assert hub.reported_patches == [
        {"status": "ready", "model": {"name": "cxr", "version": 3}},
        {"model": {"version": 4}, "status": None},
    ]
    assert hub.reported == {"model": {"name": "cxr", "version": 4}}
    assert client.get_twin()["reported"] == {"model": {"name": "cxr", "version": 4}, "$version": 3}


def test_desired_patch_reaches_the_handler(hub: FakeEdgeHub, make_client: ClientFactory) -> None:
    client = make_client()
    client.connect()
    patches: list[dict[str, Any]] = []
    client.on_twin_desired_properties_patch_received = patches.append

    version = hub.patch_desired({"threshold": 0.7, "labels": {"nodule": None}})
    assert version == 2
    hub.wait_for(lambda: len(patches) == 1, what="the desired patch at the module")
    assert patches[0] == {"threshold": 0.7, "labels": {"nodule": None}, "$version": 2}
    assert hub.desired == {"threshold": 0.7, "labels": {"effusion": True}}
    assert client.get_twin()["desired"] == {"threshold": 0.7, "labels": {"effusion": True}, "$version": 2}


def test_output_message_with_properties(hub: FakeEdgeHub, make_client: ClientFactory) -> None:
    client = make_client()
    client.connect()
    message = Message(
        b'{"finding": "effusion"}',
        message_id="study-1/result",
        content_type="application/json",
        content_encoding="utf-8",
    )
    message.custom_properties["priority"] = "urgent"
    message.custom_properties["study uid"] = "1.2.3&4=5"
    client.send_message_to_output(message, "results")
    client.send_message_to_output("plain", "heartbeat")

    hub.wait_for(lambda: len(hub.outputs) == 2, what="both outputs")
    (result,) = hub.outputs_on("results")
    assert result.body == b'{"finding": "effusion"}'
    assert result.properties == {
        "$.on": "results",
        "$.mid": "study-1/result",
        "$.ct": "application/json",
        "$.ce": "utf-8",
        "priority": "urgent",
        "study uid": "1.2.3&4=5",
    }
    assert result.topic.startswith("devices/box-1/modules/HealthDiagEdgeInference/messages/events/%24.on=")
    (heartbeat,) = hub.outputs_on("heartbeat")
    assert heartbeat.body == b"plain"
    assert heartbeat.properties == {"$.on": "heartbeat"}


def test_direct_method_round_trip(hub: FakeEdgeHub, make_client: ClientFactory) -> None:
    client = make_client()
    client.connect()

    def on_method(request: MethodRequest) -> None:
        if request.name == "health":
            response = MethodResponse.create_from_method_request(
                request, 200, {"ok": True, "echo": request.payload}
            )
        else:
            response = MethodResponse.create_from_method_request(request, 404, {"error": request.name})
        client.send_method_response(response)

    client.on_method_request_received = on_method
    assert hub.call_method("health", {"x": 1}) == (200, {"ok": True, "echo": {"x": 1}})
    assert hub.call_method("health") == (200, {"ok": True, "echo": None})
    assert hub.call_method("reboot", timeout=10) == (404, {"error": "reboot"})


def test_input_reaches_the_handler(hub: FakeEdgeHub, make_client: ClientFactory) -> None:
    client = make_client()
    client.connect()
    received: list[Message] = []
    client.on_message_received = received.append

    hub.send_input("control", b'{"pause": true}', {"$.mid": "ctl-1", "reason": "a/b c"})
    hub.wait_for(lambda: len(received) == 1, what="the input at the module")
    message = received[0]
    assert message.input_name == "control"
    assert message.data == b'{"pause": true}'
    assert message.message_id == "ctl-1"
    assert message.custom_properties == {"reason": "a/b c"}


# The fixture's own outage and renewal behaviour (10 s and 5 s of waiting each) runs in the slow suite;
# the runtime's outage and renewal paths are in tests/test_azure_module.py, in the default one.
@pytest.mark.slow
def test_sas_token_renewal_signs_again_and_reconnects(hub: FakeEdgeHub, make_client: ClientFactory) -> None:
    client = make_client(sastoken_ttl=125)
    # The first token is signed when the client is created, before any connect.
    assert len(hub.sign_requests) == 1
    client.connect()
    assert hub.connects == 1

    hub.wait_for(lambda: len(hub.sign_requests) >= 2, 20, "the SDK to renew its SAS token")
    first, second = hub.sign_requests[:2]
    for request in (first, second):
        assert (request.module_id, request.generation_id) == ("HealthDiagEdgeInference", "gen-1")
        assert (request.key_id, request.algo, request.status) == ("primary", "HMACSHA256", 200)
        assert request.data.startswith("fake-hub.azure-devices.net%2Fdevices%2Fbox-1%2Fmodules%2F")
    assert second.expiry > first.expiry
    assert 3 <= second.at - first.at <= 10
    hub.wait_for(lambda: hub.connects >= 2, 20, "the reconnect with the renewed token")

    client.send_message_to_output("after renewal", "results")
    hub.wait_for(lambda: len(hub.outputs_on("results")) == 1, what="an output after the renewal")


@pytest.mark.slow
def test_outage_client_reconnects_and_sessions_survive(hub: FakeEdgeHub, make_client: ClientFactory) -> None:
    client = make_client()
    client.connect()
    assert client.get_twin()["desired"]["$version"] == 1
    received: list[Message] = []
    client.on_message_received = received.append
    client.send_message_to_output("before", "results")
    hub.wait_for(lambda: len(hub.outputs_on("results")) == 1, what="the output before the outage")

    hub.stop_broker()
    hub.wait_for(lambda: not client.connected, 10, "the client to notice the outage")
    # A send while edgeHub is down fails after one connect attempt (auto_connect); it does not wait.
    with pytest.raises(ConnectionFailedError):
        client.send_message_to_output("during", "results")

    hub.start_broker()
    # connection_retry (default): the SDK retries every connection_retry_interval (10 s).
    hub.wait_for(lambda: client.connected, 30, "the client to reconnect by itself")
    assert hub.connects >= 2
    # The module's subscriptions (twin responses, inputs) lived on in its session.
    assert client.get_twin()["desired"] == {**DESIRED, "$version": 1}
    hub.send_input("control", b"after")
    hub.wait_for(lambda: len(received) == 1, what="an input after the outage")
    client.send_message_to_output("after", "results")
    hub.wait_for(lambda: len(hub.outputs_on("results")) == 2, what="the output after the outage")
    assert [m.body for m in hub.outputs_on("results")] == [b"before", b"after"]


@pytest.mark.slow
def test_outage_that_loses_sessions_cuts_the_client_off(hub: FakeEdgeHub, make_client: ClientFactory) -> None:
    """The control for the test above: it is the hub's session store, not the SDK, that resubscribes."""
    client = make_client()
    client.connect()
    received: list[Message] = []
    client.on_message_received = received.append

    hub.stop_broker(keep_sessions=False)
    hub.wait_for(lambda: not client.connected, 10, "the client to notice the outage")
    hub.start_broker()
    hub.wait_for(lambda: client.connected, 30, "the client to reconnect by itself")
    hub.send_input("control", b"lost")
    client.send_message_to_output("still sent", "results")
    hub.wait_for(lambda: len(hub.outputs_on("results")) == 1, what="the output after the outage")
    assert received == []


def test_workload_api_refuses_another_generation(hub: FakeEdgeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in hub.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("IOTEDGE_MODULEGENERATIONID", "gen-old")
    with pytest.raises(ValueError, match="SasToken"):
        IoTHubModuleClient.create_from_edge_environment()
    (request,) = hub.sign_requests
    assert (request.generation_id, request.status) == ("gen-old", 404)

    url = "http+unix://" + str(hub.socket_path).replace("/", "%2F")
    with requests_unixsocket.Session() as session:
        refused = session.post(
            f"{url}/modules/SomeoneElse/genid/gen-1/sign?api-version=2019-01-30",
            json={"keyId": "primary", "algo": "HMACSHA256", "data": "YQ=="},
        )
        assert refused.status_code == 404 and "SomeoneElse" in refused.json()["message"]
        bundle = session.get(f"{url}/trust-bundle?api-version=2019-01-30")
        assert bundle.json() == {"certificate": hub.ca_pem}
    assert [r.module_id for r in hub.sign_requests] == ["HealthDiagEdgeInference", "SomeoneElse"]


def test_the_fake_refuses_reported_properties_iot_hub_refuses(
    hub: FakeEdgeHub, make_client: ClientFactory
) -> None:
    """Mosquitto takes anything; IoT Hub refuses '.', '$' or spaces in names and strings over 4 KB."""
    client = make_client()
    client.connect()
    for bad in ({"a.b": 1}, {"note": "x" * 5000}):
        with pytest.raises(Exception):  # noqa: B017 - the SDK's error for a 400 answer
            client.patch_twin_reported_properties(bad)
    assert len(hub.refusals) == 2 and "a.b" in hub.refusals[0] and "4 KB" in hub.refusals[1]
    client.patch_twin_reported_properties({"ok": {"nested": "fine"}})
    assert hub.reported["ok"] == {"nested": "fine"}
    hub.refusals.clear()
