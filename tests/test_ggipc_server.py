"""The fake nucleus against the real, unmodified awsiotsdk IPC client.

Each SDK test goes through ``GreengrassCoreIPCClientV2()`` built from the environment the
nucleus would give a component, so a passing test means the runtime's own IPC code will
find the same wire behaviour here as on a device.  The codec is also checked in both
directions against awscrt's C encoder/decoder (CONNECT headers in, PING headers out).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

awsiot = pytest.importorskip("awsiot.greengrasscoreipc")

from awscrt.eventstream import Header as CrtHeader  # noqa: E402
from awscrt.exceptions import AwsCrtError  # noqa: E402
from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup, SocketDomain, SocketOptions  # noqa: E402
from awsiot.eventstreamrpc import (  # noqa: E402
    AccessDeniedError,
    Connection,
    LifecycleHandler,
    MessageAmendment,
    StreamClosedError,
)
from awsiot.greengrasscoreipc import model  # noqa: E402
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2  # noqa: E402
from ggipc import (  # noqa: E402
    FakeNucleus,
    FramingError,
    Header,
    HeaderType,
    Message,
    MessageFlag,
    MessageType,
    StreamDecoder,
    decode_message,
    encode_message,
)
from ggipc.server import iter_messages  # noqa: E402

TIMEOUT = 5.0
CONFIG = {
    "Inference": {"Threshold": 0.42, "Labels": ["normal", "pneumonia"], "Model": {"Name": "effnet-lite0"}},
    "Mqtt": {"Topic": "healthdiag/results"},
}

# Every header type with edge values, to push through both codecs.
ALL_TYPES: list[tuple[str, Any, HeaderType]] = [
    ("t-true", True, HeaderType.BOOL_TRUE),
    ("t-false", False, HeaderType.BOOL_FALSE),
    ("t-byte", -128, HeaderType.BYTE),
    ("t-int16", 32767, HeaderType.INT16),
    ("t-int32", -(2**31), HeaderType.INT32),
    ("t-int64", 2**63 - 1, HeaderType.INT64),
    ("t-bytes", b"\x00\xffbin", HeaderType.BYTE_BUF),
    ("t-string", "Thorax \u00e9\u6f22 \U0001f9b4", HeaderType.STRING),
    ("t-timestamp", 1_700_000_000_123, HeaderType.TIMESTAMP),
    ("t-uuid", uuid.UUID("12345678-9abc-def0-1234-56789abcdef0"), HeaderType.UUID),
]
_OURS = {
    HeaderType.BOOL_TRUE: Header.from_bool, HeaderType.BOOL_FALSE: Header.from_bool,
    HeaderType.BYTE: Header.from_byte, HeaderType.INT16: Header.from_int16,
    HeaderType.INT32: Header.from_int32, HeaderType.INT64: Header.from_int64,
    HeaderType.BYTE_BUF: Header.from_byte_buf, HeaderType.STRING: Header.from_string,
    HeaderType.TIMESTAMP: Header.from_timestamp, HeaderType.UUID: Header.from_uuid,
}  # fmt: skip
_CRT = {
    HeaderType.BOOL_TRUE: CrtHeader.from_bool, HeaderType.BOOL_FALSE: CrtHeader.from_bool,
    HeaderType.BYTE: CrtHeader.from_byte, HeaderType.INT16: CrtHeader.from_int16,
    HeaderType.INT32: CrtHeader.from_int32, HeaderType.INT64: CrtHeader.from_int64,
    HeaderType.BYTE_BUF: CrtHeader.from_byte_buf, HeaderType.STRING: CrtHeader.from_string,
    HeaderType.TIMESTAMP: CrtHeader.from_timestamp, HeaderType.UUID: CrtHeader.from_uuid,
}  # fmt: skip


def our_headers() -> list[Header]:
    return [_OURS[kind](name, value) for name, value, kind in ALL_TYPES]


def as_triples(headers: list[Any]) -> list[tuple[str, Any, int]]:
    """Comparable (name, value, type) for our headers and awscrt's alike."""
    return [(h.name, h.value, int(h.type)) for h in headers if not h.name.startswith(":")]


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture
def nucleus() -> Iterator[FakeNucleus]:
    with FakeNucleus(component_name="com.healthdiag.EdgeRuntime", configuration=CONFIG) as fake:
        yield fake


@pytest.fixture
def ipc(nucleus: FakeNucleus, monkeypatch: pytest.MonkeyPatch) -> Iterator[GreengrassCoreIPCClientV2]:
    """The SDK client exactly as a component builds it: no arguments, env from the nucleus."""
    for key, value in nucleus.env().items():
        monkeypatch.setenv(key, value)
    client = GreengrassCoreIPCClientV2()
    yield client
    client.close().exception(TIMEOUT)  # waits; a test that dropped the link checks the reason itself


def result(future: Future) -> Any:
    """Wait for an SDK future, bounded: a broken server must fail the test, not hang it."""
    return future.result(TIMEOUT)


class Recorder:
    """Collects stream events from SDK callbacks and lets the test wait for a count."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.closed = threading.Event()
        self._cond = threading.Condition()

    def on_event(self, event: Any) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def on_closed(self) -> None:
        self.closed.set()

    def wait_for(self, count: int) -> list[Any]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.events) >= count, TIMEOUT), self.events
            return list(self.events)


# --------------------------------------------------------------------------------------
# codec
# --------------------------------------------------------------------------------------


def test_codec_round_trips_every_header_type() -> None:
    payload = json.dumps({"k": "v" * 300}).encode()
    frame = encode_message(our_headers(), payload)

    total, _headers_len, prelude_crc = struct.unpack(">III", frame[:12])
    assert total == len(frame)
    assert prelude_crc == zlib.crc32(frame[:8])
    assert struct.unpack(">I", frame[-4:])[0] == zlib.crc32(frame[:-4])

    decoded = decode_message(frame)
    assert as_triples(decoded.headers) == [(n, v, int(t)) for n, v, t in ALL_TYPES]
    assert decoded.payload == payload
    assert decoded.get("T-STRING") is not None  # names compare case-insensitively, as in aws-c

    # The incremental decoder must reassemble frames split at every possible byte boundary.
    stream = frame + encode_message([Header.from_int32(":message-type", 2)]) + frame
    decoder = StreamDecoder()
    out: list[Message] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert [len(m.headers) for m in out] == [len(ALL_TYPES), 1, len(ALL_TYPES)]
    assert decoder.pending == 0


def test_codec_range_checks_values() -> None:
    with pytest.raises(ValueError):
        Header.from_byte("b", 128)
    with pytest.raises(ValueError):
        Header.from_int32("i", 2**31)
    with pytest.raises(ValueError):
        encode_message([Header.from_byte_buf("big", b"x" * 70000)])
    with pytest.raises(TypeError):
        Header.from_uuid("u", "not-a-uuid")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("offset", "reason"),
    [(0, "prelude CRC"), (9, "prelude CRC"), (20, "message CRC"), (-1, "message CRC")],
)
def test_codec_rejects_corrupted_frames(offset: int, reason: str) -> None:
    frame = bytearray(encode_message(our_headers(), b"payload"))
    frame[offset] ^= 0x01
    with pytest.raises(FramingError, match=reason):
        decode_message(bytes(frame))
    with pytest.raises(FramingError, match=reason):
        StreamDecoder().feed(bytes(frame))


def test_codec_rejects_malformed_lengths() -> None:
    prelude = struct.pack(">II", 8, 0)  # shorter than prelude + CRC, though its CRC is right
    with pytest.raises(FramingError, match="out of range"):
        StreamDecoder().feed(prelude + struct.pack(">I", zlib.crc32(prelude)))
    good = encode_message([Header.from_string("a", "b")])
    with pytest.raises(FramingError, match="prelude says"):
        decode_message(good[:-1])


def _sdk_connection(nucleus: FakeNucleus, handler: LifecycleHandler, headers: list[CrtHeader]) -> Connection:
    """An awscrt RPC connection whose CONNECT carries extra headers (built like ``connect()``)."""
    elg = EventLoopGroup(1)
    options = SocketOptions()
    options.domain = SocketDomain.Local
    payload = json.dumps({"authToken": nucleus.svcuid}).encode()
    connection = Connection(
        host_name=nucleus.socket_path,
        port=0,
        bootstrap=ClientBootstrap(elg, DefaultHostResolver(elg)),
        socket_options=options,
        connect_message_amender=lambda: MessageAmendment(headers=headers, payload=payload),
    )
    result(connection.connect(handler))
    return connection


def test_codec_interoperates_with_awscrt_both_ways(nucleus: FakeNucleus) -> None:
    pinged: Future = Future()

    class Handler(LifecycleHandler):
        def on_ping(self, headers: list[CrtHeader], payload: bytes) -> None:
            pinged.set_result((headers, payload))

    crt_headers = [_CRT[kind](name, value) for name, value, kind in ALL_TYPES]
    connection = _sdk_connection(nucleus, Handler(), crt_headers)
    try:
        # awscrt's C encoder -> our decoder
        connect = nucleus.connect_messages[-1]
        assert connect.value(":version") == "0.1.0"
        assert connect.value(":message-type") == MessageType.CONNECT
        assert as_triples(connect.headers)[-len(ALL_TYPES) :] == [(n, v, int(t)) for n, v, t in ALL_TYPES]
        # our encoder -> awscrt's C decoder
        assert nucleus.send_ping(our_headers(), b"\x00ping") == 1
        headers, payload = result(pinged)
        assert as_triples(headers) == [(n, v, int(t)) for n, v, t in ALL_TYPES]
        assert payload == b"\x00ping"
    finally:
        result(connection.close())


# --------------------------------------------------------------------------------------
# the SDK client against the server
# --------------------------------------------------------------------------------------


def test_get_configuration_nested_whole_and_missing(
    ipc: GreengrassCoreIPCClientV2, nucleus: FakeNucleus
) -> None:
    leaf = result(ipc.get_configuration_async(key_path=["Inference", "Threshold"]))
    assert leaf.component_name == "com.healthdiag.EdgeRuntime"
    assert leaf.value == {"Threshold": 0.42}  # the nucleus wraps a leaf as {key: value}

    subtree = result(ipc.get_configuration_async(key_path=["Inference", "Model"]))
    assert subtree.value == {"Name": "effnet-lite0"}

    whole = ipc.get_configuration(key_path=[])  # the blocking call a component would make
    assert whole.value == CONFIG

    with pytest.raises(model.ResourceNotFoundError):
        result(ipc.get_configuration_async(key_path=["Inference", "Nope"]))
    with pytest.raises(model.ResourceNotFoundError):
        result(ipc.get_configuration_async(component_name="com.other.Missing", key_path=[]))

    assert [c.operation for c in nucleus.calls] == ["GetConfiguration"] * 5
    assert nucleus.calls_for("GetConfiguration")[0] == {"keyPath": ["Inference", "Threshold"]}


def test_configuration_updates_reach_the_subscriber(
    ipc: GreengrassCoreIPCClientV2, nucleus: FakeNucleus
) -> None:
    everything, inference = Recorder(), Recorder()
    fut, op = ipc.subscribe_to_configuration_update_async(
        key_path=[], on_stream_event=everything.on_event, on_stream_closed=everything.on_closed
    )
    result(fut)
    fut2, _ = ipc.subscribe_to_configuration_update_async(
        key_path=["Inference"], on_stream_event=inference.on_event
    )
    result(fut2)
    nucleus.wait_until(lambda: nucleus.subscriber_count("SubscribeToConfigurationUpdate") == 2)

    # A config-only deployment...
    assert nucleus.set_configuration(None, ["Inference", "Threshold"], 0.6) == [["Inference", "Threshold"]]
    event = everything.wait_for(1)[0].configuration_update_event
    assert event.component_name == "com.healthdiag.EdgeRuntime"
    assert event.key_path == ["Inference", "Threshold"]
    threshold = result(ipc.get_configuration_async(key_path=["Inference", "Threshold"]))
    assert threshold.value == {"Threshold": 0.6}

    # ...and the component's own UpdateConfiguration (merge at a container node).
    result(
        ipc.update_configuration_async(
            key_path=["Mqtt"], timestamp=datetime.datetime.now(), value_to_merge={"Topic": "t2", "Qos": 1}
        )
    )
    paths = [e.configuration_update_event.key_path for e in everything.wait_for(3)]
    assert paths[1:] == [["Mqtt", "Topic"], ["Mqtt", "Qos"]]
    assert nucleus.configuration()["Mqtt"] == {"Topic": "t2", "Qos": 1}
    # The "Inference" subscriber saw only its own subtree.
    seen = [e.configuration_update_event.key_path for e in inference.wait_for(1)]
    assert seen == [["Inference", "Threshold"]]

    # Unchanged values produce no event; a closed subscription gets nothing more.
    assert nucleus.set_configuration(None, ["Inference", "Threshold"], 0.6) == []
    result(op.close())
    nucleus.wait_until(lambda: nucleus.subscriber_count("SubscribeToConfigurationUpdate") == 1)
    nucleus.set_configuration(None, ["Mqtt", "Topic"], "t3")
    assert len(everything.events) == 3


def test_update_configuration_rejects_stale_timestamp(
    ipc: GreengrassCoreIPCClientV2, nucleus: FakeNucleus
) -> None:
    nucleus.set_configuration(None, ["Mqtt", "Topic"], "fresh")
    stale = datetime.datetime.now() - datetime.timedelta(hours=1)
    with pytest.raises(model.FailedUpdateConditionCheckError):
        result(
            ipc.update_configuration_async(
                key_path=["Mqtt"], timestamp=stale, value_to_merge={"Topic": "old"}
            )
        )
    assert nucleus.configuration()["Mqtt"]["Topic"] == "fresh"


def test_subscribing_to_a_missing_key_fails(ipc: GreengrassCoreIPCClientV2) -> None:
    fut, _ = ipc.subscribe_to_configuration_update_async(key_path=["Nope"], on_stream_event=lambda e: None)
    with pytest.raises(model.ResourceNotFoundError):
        result(fut)


def test_update_state_is_recorded(ipc: GreengrassCoreIPCClientV2, nucleus: FakeNucleus) -> None:
    ipc.update_state(state=model.ReportedLifecycleState.RUNNING)
    result(ipc.update_state_async(state=model.ReportedLifecycleState.ERRORED))
    assert nucleus.states() == ["RUNNING", "ERRORED"]
    assert nucleus.calls_for("UpdateState") == [{"state": "RUNNING"}, {"state": "ERRORED"}]


def test_publish_to_topic_json_and_binary(ipc: GreengrassCoreIPCClientV2, nucleus: FakeNucleus) -> None:
    local = Recorder()
    result(ipc.subscribe_to_topic_async(topic="healthdiag/+/status", on_stream_event=local.on_event)[0])
    # A wildcard filter defaults to RECEIVE_MESSAGES_FROM_OTHERS, so our own publishes are not echoed...
    mine = Recorder()
    result(ipc.subscribe_to_topic_async(topic="healthdiag/scan/status", on_stream_event=mine.on_event)[0])

    doc = {"study": "1.2.3", "score": 0.91}
    result(
        ipc.publish_to_topic_async(
            topic="healthdiag/scan/status",
            publish_message=model.PublishMessage(json_message=model.JsonMessage(message=doc)),
        )
    )
    result(
        ipc.publish_to_topic_async(
            topic="healthdiag/scan/status",
            publish_message=model.PublishMessage(binary_message=model.BinaryMessage(message=b"\x89PNG")),
        )
    )
    calls = nucleus.calls_for("PublishToTopic")
    assert calls[0] == {
        "topic": "healthdiag/scan/status",
        "publishMessage": {"jsonMessage": {"message": doc}},
    }
    assert calls[1]["publishMessage"]["binaryMessage"]["message"] == b"\x89PNG"

    # ...but an exact-topic subscription (RECEIVE_ALL_MESSAGES) gets both, with the topic as context.
    first, second = mine.wait_for(2)
    assert first.json_message.message == doc and first.json_message.context.topic == "healthdiag/scan/status"
    assert second.binary_message.message == b"\x89PNG"
    # Another component's message does reach the wildcard subscriber.
    assert nucleus.publish_local("healthdiag/other/status", json_message={"from": "peer"}) == 1
    assert local.wait_for(1)[0].json_message.message == {"from": "peer"}

    with pytest.raises(model.InvalidArgumentsError):
        result(
            ipc.publish_to_topic_async(
                topic="healthdiag/#",
                publish_message=model.PublishMessage(json_message=model.JsonMessage(message={})),
            )
        )


def test_publish_to_iot_core_at_least_once(ipc: GreengrassCoreIPCClientV2, nucleus: FakeNucleus) -> None:
    body = json.dumps({"study": "1.2.3", "label": "pneumonia"}).encode()
    ipc.publish_to_iot_core(topic_name="healthdiag/results/dev1", qos=model.QOS.AT_LEAST_ONCE, payload=body)
    (call,) = nucleus.calls_for("PublishToIoTCore")
    assert call == {"topicName": "healthdiag/results/dev1", "qos": "1", "payload": body}

    # The cloud side: deliver a message to a SubscribeToIoTCore stream.
    commands = Recorder()
    result(
        ipc.subscribe_to_iot_core_async(
            topic_name="healthdiag/cmd/#", qos=model.QOS.AT_MOST_ONCE, on_stream_event=commands.on_event
        )[0]
    )
    assert nucleus.deliver_iot_core_message("healthdiag/cmd/reload", b'{"op":"reload"}') == 1
    message = commands.wait_for(1)[0].message
    assert (message.topic_name, message.payload) == ("healthdiag/cmd/reload", b'{"op":"reload"}')


def test_wrong_svcuid_is_refused(nucleus: FakeNucleus, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in nucleus.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SVCUID", "not-the-token")
    with pytest.raises(AccessDeniedError):
        GreengrassCoreIPCClientV2()
    assert nucleus.rejected_connects == 1
    nucleus.wait_until(lambda: nucleus.connection_count == 0)


COMPONENT_SCRIPT = """
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc import model
ipc = GreengrassCoreIPCClientV2()
threshold = ipc.get_configuration(key_path=["Inference", "Threshold"]).value["Threshold"]
ipc.publish_to_iot_core(topic_name="healthdiag/results", qos=model.QOS.AT_LEAST_ONCE, payload=b"ok")
ipc.update_state(state="RUNNING")
print(threshold)
ipc.close()
"""


def test_component_process_talks_to_nucleus(ipc: GreengrassCoreIPCClientV2, nucleus: FakeNucleus) -> None:
    """A separate process, as the nucleus would launch it, beside an in-process client."""
    proc = subprocess.run(
        [sys.executable, "-c", COMPONENT_SCRIPT],
        env={**os.environ, **nucleus.env()},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0.42"
    assert nucleus.states() == ["RUNNING"]
    (published,) = nucleus.calls_for("PublishToIoTCore")
    assert published == {"topicName": "healthdiag/results", "qos": "1", "payload": b"ok"}
    assert result(ipc.get_configuration_async(key_path=[])).value == CONFIG  # the other link still works


def test_errors_injected_and_custom_handlers(ipc: GreengrassCoreIPCClientV2, nucleus: FakeNucleus) -> None:
    nucleus.inject_error("PublishToIoTCore", "UnauthorizedError", "not allowed", times=1)
    with pytest.raises(model.UnauthorizedError):
        ipc.publish_to_iot_core(topic_name="x", qos=model.QOS.AT_MOST_ONCE, payload=b"1")
    ipc.publish_to_iot_core(topic_name="x", qos=model.QOS.AT_MOST_ONCE, payload=b"2")
    assert [c["payload"] for c in nucleus.calls_for("PublishToIoTCore")] == [b"1", b"2"]

    # An operation of the model that the fake does not implement: the nucleus's ServiceError.
    with pytest.raises(model.ServiceError):
        result(ipc.get_secret_value_async(secret_id="db"))
    nucleus.register_handler(
        "GetSecretValue",
        lambda req, component: {
            "secretId": req["secretId"],
            "versionId": "v1",
            "secretValue": {"secretString": f"for {component}"},
        },
    )
    secret = result(ipc.get_secret_value_async(secret_id="db"))
    assert secret.secret_value.secret_string == "for com.healthdiag.EdgeRuntime"


def test_dropped_connection_closes_open_streams(ipc: GreengrassCoreIPCClientV2, nucleus: FakeNucleus) -> None:
    rec = Recorder()
    result(
        ipc.subscribe_to_configuration_update_async(
            key_path=[], on_stream_event=rec.on_event, on_stream_closed=rec.on_closed
        )[0]
    )
    nucleus.drop_connections()  # what a component sees when the nucleus restarts
    assert rec.closed.wait(TIMEOUT)
    assert isinstance(ipc.client.close().exception(TIMEOUT), AwsCrtError)  # not a clean close
    assert nucleus.subscriber_count() == 0


# --------------------------------------------------------------------------------------
# raw protocol (our codec as the client)
# --------------------------------------------------------------------------------------


def _rpc(
    mtype: MessageType, flags: int = 0, stream_id: int = 0, *extra: Header, payload: bytes = b""
) -> bytes:
    headers = [
        Header.from_int32(":message-type", mtype),
        Header.from_int32(":message-flags", flags),
        Header.from_int32(":stream-id", stream_id),
        *extra,
    ]
    return encode_message(headers, payload)


@pytest.fixture
def raw(nucleus: FakeNucleus) -> Iterator[tuple[socket.socket, Iterator[Message]]]:
    """A hand-driven client socket that has completed the CONNECT handshake."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(nucleus.socket_path)
    token = json.dumps({"authToken": nucleus.svcuid}).encode()
    sock.sendall(_rpc(MessageType.CONNECT, 0, 0, Header.from_string(":version", "0.1.0"), payload=token))
    messages = iter_messages(sock)
    ack = next(messages)
    assert ack.value(":message-type") == MessageType.CONNECT_ACK
    assert ack.value(":message-flags") == MessageFlag.CONNECTION_ACCEPTED
    yield sock, messages
    sock.close()


def test_server_rejects_frames_with_bad_crc(
    raw: tuple[socket.socket, Iterator[Message]], nucleus: FakeNucleus
) -> None:
    sock, messages = raw
    frame = bytearray(
        _rpc(
            MessageType.APPLICATION_MESSAGE,
            0,
            1,
            Header.from_string("operation", "aws.greengrass#UpdateState"),
            Header.from_string(":content-type", "application/json"),
            Header.from_string("service-model-type", "aws.greengrass#UpdateStateRequest"),
            payload=b'{"state":"RUNNING"}',
        )
    )
    frame[-6] ^= 0x20  # flip a payload bit; the message CRC no longer matches
    sock.sendall(bytes(frame))
    error = next(messages)
    assert error.value(":message-type") == MessageType.PROTOCOL_ERROR
    assert "CRC" in json.loads(error.payload)["message"]
    assert list(messages) == []  # then the server hangs up
    assert nucleus.calls == [] and nucleus.states() == []
    assert nucleus.protocol_errors == ["malformed frame: message CRC mismatch"]


def test_ping_and_unknown_operation(raw: tuple[socket.socket, Iterator[Message]]) -> None:
    sock, messages = raw
    sock.sendall(_rpc(MessageType.PING, 0, 0, Header.from_string("x-echo", "hi"), payload=b"p"))
    pong = next(messages)
    assert pong.value(":message-type") == MessageType.PING_RESPONSE
    assert (pong.value("x-echo"), pong.payload) == ("hi", b"p")

    sock.sendall(
        _rpc(
            MessageType.APPLICATION_MESSAGE,
            0,
            1,
            Header.from_string("operation", "aws.greengrass#Frobnicate"),
            Header.from_string(":content-type", "application/json"),
            payload=b"{}",
        )
    )
    reply = next(messages)
    assert reply.value(":message-type") == MessageType.APPLICATION_ERROR
    assert reply.value(":stream-id") == 1
    assert reply.value(":message-flags") & MessageFlag.TERMINATE_STREAM
    assert reply.get("service-model-type") is None
    assert json.loads(reply.payload)["error"] == "Unsupported Operation"


def test_sdk_sees_unknown_operation_as_closed_stream(ipc: GreengrassCoreIPCClientV2) -> None:
    """What the SDK makes of the server's reply to an operation outside the service."""

    class Frobnicate(model._UpdateStateOperation):
        @classmethod
        def _model_name(cls) -> str:
            return "aws.greengrass#Frobnicate"

    operation = ipc.client._new_operation(Frobnicate)
    operation._activate(model.UpdateStateRequest(state="RUNNING"))
    with pytest.raises(StreamClosedError):
        result(operation._get_response())
