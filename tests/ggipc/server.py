"""A fake Greengrass nucleus: the real event-stream RPC protocol on a Unix socket.

Why this exists
---------------
The Greengrass nucleus (and ``greengrass-cli``) cannot be installed on the build machines,
yet the edge runtime talks to it through the unmodified ``awsiotsdk`` client
(``GreengrassCoreIPCClientV2``).  Mocking that client would only test our own assumptions,
so this module is the *other end of the wire*: a small threaded server that the real
client connects to, authenticates with, and calls, exactly as it would on a device.

Wire format (AWS event-stream)
------------------------------
Every message is one frame, all integers big-endian::

    total_len u32 | headers_len u32 | prelude_crc u32 (CRC32 of the first 8 bytes)
    headers (headers_len bytes) | payload | message_crc u32 (CRC32 of everything before it)

A header is ``name_len u8, name (utf-8), type u8, value``; value encodings by type:
0 bool true / 1 bool false (no bytes), 2 byte (i8), 3 int16, 4 int32, 5 int64,
6 bytes (u16 length + data), 7 string (u16 length + utf-8), 8 timestamp (i64; the spec says
milliseconds since the epoch, awscrt passes the integer through unchanged), 9 uuid (16 bytes).
Both CRCs are verified on input; a bad frame cannot be re-synchronised, so the connection
gets a PROTOCOL_ERROR message and is closed.

RPC layer on top (``awscrt``'s ``aws-c-event-stream`` RPC client)
-----------------------------------------------------------------
* Every message carries int32 headers ``:message-type``, ``:message-flags`` and
  ``:stream-id`` (the C client rejects a message lacking any of them).
* Message types: 0 APPLICATION_MESSAGE, 1 APPLICATION_ERROR, 2 PING, 3 PING_RESPONSE,
  4 CONNECT, 5 CONNECT_ACK, 6 PROTOCOL_ERROR, 7 INTERNAL_ERROR.
  Flags: 1 CONNECTION_ACCEPTED (CONNECT_ACK only), 2 TERMINATE_STREAM.
* Handshake: the client's first message is CONNECT (stream 0) with ``:version`` = ``0.1.0``
  and payload ``{"authToken": "<SVCUID>"}``; the server answers CONNECT_ACK with flag 1,
  or CONNECT_ACK without it and then closes the connection (the client raises
  ``AccessDeniedError``).  PING is answered with PING_RESPONSE echoing the non-``:``
  headers and the payload.
* A request opens a stream: APPLICATION_MESSAGE with a new client-chosen ``:stream-id``, a
  string header ``operation`` (e.g. ``aws.greengrass#GetConfiguration``),
  ``:content-type: application/json``, ``service-model-type`` (e.g.
  ``aws.greengrass#GetConfigurationRequest``) and a JSON payload.  The first reply on the
  stream must be typed ``aws.greengrass#<Operation>Response`` (the Python client rejects any
  other name) and carry ``:content-type: application/json``; unary replies set
  TERMINATE_STREAM.  Streaming operations (SubscribeTo*) keep the stream open and push
  events typed with the operation's stream shape (e.g. ``aws.greengrass#ConfigurationUpdateEvents``).
  The client ends a subscription with an empty APPLICATION_MESSAGE flagged TERMINATE_STREAM.
* Modelled errors are APPLICATION_ERROR + TERMINATE_STREAM with ``service-model-type``
  ``aws.greengrass#<ErrorShape>`` and payload ``{"message": ...}``; the client raises the
  SDK's exception of that name (``ResourceNotFoundError``, ``ServiceError``...).
* An operation the nucleus knows from the model but does not implement is answered with
  ``ServiceError`` "Operation ... is not supported by Greengrass"; an operation name outside
  the service is answered with an APPLICATION_ERROR that has no ``service-model-type`` and
  payload ``{"error": "Unsupported Operation", ...}``, which the Python client surfaces as
  ``StreamClosedError``.  Both mirror what the nucleus does.

Checked against
---------------
* awsiotsdk 1.31 / awscrt 0.36 in site-packages: ``awscrt/eventstream/__init__.py`` (header
  types), ``awscrt/eventstream/rpc.py`` (message types, flags), ``awsiot/eventstreamrpc.py``
  (``:version``, CONNECT amender payload, content-type and ``service-model-type`` checks,
  response/stream-event/error dispatch), ``awsiot/greengrasscoreipc/__init__.py`` (env vars)
  and ``awsiot/greengrasscoreipc/model.py`` (JSON member names, base64 blobs, timestamps in
  epoch seconds, enum values such as QOS ``"0"``/``"1"``).
* awslabs/aws-c-event-stream ``source/event_stream_rpc.c`` and
  ``source/event_stream_rpc_client.c`` (required int32 headers, handshake, stream routing).
* awslabs/smithy-iot-device-sdk-greengrass-ipc ``greengrass-ipc-model/main.smithy``
  (operations, shapes, modelled errors) and aws/aws-iot-device-sdk-java-v2
  ``sdk/greengrass/event-stream-rpc-server`` (``ServiceOperationMappingContinuationHandler``,
  ``OperationContinuationHandler``: CONNECT_ACK, PING echo, error framing).
* aws-greengrass/aws-greengrass-nucleus ``ConfigStoreIPCEventStreamAgent`` (GetConfiguration
  wraps a leaf as ``{key: value}``, UpdateConfiguration merge + timestamp check, one update
  event per changed node with its key path relative to the component configuration),
  ``PubSubIPCEventStreamAgent`` (wildcards, receive modes, ``MessageContext``) and
  ``DefaultOperationHandler`` (unsupported operations).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import enum
import json
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# --------------------------------------------------------------------------------------
# event-stream codec
# --------------------------------------------------------------------------------------

PRELUDE_LEN = 12
MESSAGE_CRC_LEN = 4
MIN_MESSAGE_LEN = PRELUDE_LEN + MESSAGE_CRC_LEN
# aws-c-event-stream refuses frames beyond these sizes; so do we, so that a corrupt length
# cannot make the server wait for gigabytes.
MAX_MESSAGE_LEN = 16 * 1024 * 1024
MAX_HEADERS_LEN = 128 * 1024

_INT_RANGES: dict[str, tuple[int, int]] = {
    "b": (-(2**7), 2**7 - 1),
    "h": (-(2**15), 2**15 - 1),
    "i": (-(2**31), 2**31 - 1),
    "q": (-(2**63), 2**63 - 1),
}


class FramingError(ValueError):
    """A frame that violates the event-stream format (bad CRC, length or header)."""


class HeaderType(enum.IntEnum):
    """Header value types, numbered as on the wire (same values as ``awscrt.eventstream.HeaderType``)."""

    BOOL_TRUE = 0
    BOOL_FALSE = 1
    BYTE = 2
    INT16 = 3
    INT32 = 4
    INT64 = 5
    BYTE_BUF = 6
    STRING = 7
    TIMESTAMP = 8
    UUID = 9


_INT_FORMATS: dict[HeaderType, str] = {
    HeaderType.BYTE: "b",
    HeaderType.INT16: "h",
    HeaderType.INT32: "i",
    HeaderType.INT64: "q",
    HeaderType.TIMESTAMP: "q",
}


@dataclass(frozen=True)
class Header:
    """One event-stream header.  Build it with the typed constructors, which range-check."""

    name: str
    value: Any
    type: HeaderType

    @classmethod
    def from_bool(cls, name: str, value: bool) -> Header:
        """Boolean header: the value lives in the type byte (0 true, 1 false)."""
        return cls(name, bool(value), HeaderType.BOOL_TRUE if value else HeaderType.BOOL_FALSE)

    @classmethod
    def from_byte(cls, name: str, value: int) -> Header:
        """Signed 8-bit integer header."""
        return cls(name, _checked_int(value, "b"), HeaderType.BYTE)

    @classmethod
    def from_int16(cls, name: str, value: int) -> Header:
        """Signed 16-bit integer header."""
        return cls(name, _checked_int(value, "h"), HeaderType.INT16)

    @classmethod
    def from_int32(cls, name: str, value: int) -> Header:
        """Signed 32-bit integer header (the RPC layer's ``:message-type`` etc. use this)."""
        return cls(name, _checked_int(value, "i"), HeaderType.INT32)

    @classmethod
    def from_int64(cls, name: str, value: int) -> Header:
        """Signed 64-bit integer header."""
        return cls(name, _checked_int(value, "q"), HeaderType.INT64)

    @classmethod
    def from_byte_buf(cls, name: str, value: bytes | bytearray) -> Header:
        """Byte-buffer header (at most 65535 bytes)."""
        return cls(name, bytes(value), HeaderType.BYTE_BUF)

    @classmethod
    def from_string(cls, name: str, value: str) -> Header:
        """UTF-8 string header (at most 65535 encoded bytes)."""
        return cls(name, str(value), HeaderType.STRING)

    @classmethod
    def from_timestamp(cls, name: str, value: int) -> Header:
        """Timestamp header: a raw int64 on the wire (epoch milliseconds per the spec)."""
        return cls(name, _checked_int(value, "q"), HeaderType.TIMESTAMP)

    @classmethod
    def from_uuid(cls, name: str, value: uuid.UUID) -> Header:
        """UUID header (16 raw bytes on the wire)."""
        if not isinstance(value, uuid.UUID):
            raise TypeError(f"UUID header needs uuid.UUID, not {type(value).__name__}")
        return cls(name, value, HeaderType.UUID)


def _checked_int(value: int, fmt: str) -> int:
    lo, hi = _INT_RANGES[fmt]
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{value} does not fit a signed {struct.calcsize(fmt) * 8}-bit integer")
    return value


@dataclass
class Message:
    """A decoded frame: headers in wire order plus the raw payload."""

    headers: list[Header] = field(default_factory=list)
    payload: bytes = b""

    def get(self, name: str) -> Header | None:
        """First header called ``name``, compared case-insensitively as aws-c-event-stream does."""
        lowered = name.lower()
        for header in self.headers:
            if header.name.lower() == lowered:
                return header
        return None

    def value(self, name: str, expected: HeaderType | None = None, default: Any = None) -> Any:
        """Value of header ``name``, or ``default`` if absent or not of the ``expected`` type."""
        header = self.get(name)
        if header is None or (expected is not None and header.type != expected):
            return default
        return header.value


def encode_headers(headers: Iterable[Header]) -> bytes:
    """Encode headers in event-stream header encoding."""
    out = bytearray()
    for header in headers:
        name = header.name.encode("utf-8")
        if not 0 < len(name) <= 255:
            raise ValueError(f"header name must be 1..255 bytes: {header.name!r}")
        out += struct.pack(">B", len(name)) + name + struct.pack(">B", int(header.type))
        kind = header.type
        if kind in (HeaderType.BOOL_TRUE, HeaderType.BOOL_FALSE):
            continue
        if kind in _INT_FORMATS:
            fmt = _INT_FORMATS[kind]
            out += struct.pack(">" + fmt, _checked_int(header.value, fmt))
        elif kind in (HeaderType.BYTE_BUF, HeaderType.STRING):
            data = header.value.encode("utf-8") if kind == HeaderType.STRING else bytes(header.value)
            if len(data) > 0xFFFF:
                raise ValueError(f"header {header.name!r} value exceeds 65535 bytes")
            out += struct.pack(">H", len(data)) + data
        elif kind == HeaderType.UUID:
            out += header.value.bytes
        else:  # pragma: no cover - HeaderType is closed
            raise ValueError(f"unknown header type {kind!r}")
    return bytes(out)


def decode_headers(data: bytes) -> list[Header]:
    """Decode an event-stream header block; raise :class:`FramingError` if it is malformed."""
    headers: list[Header] = []
    view = memoryview(data)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise FramingError("header block truncated")
        chunk = bytes(view[pos : pos + n])
        pos += n
        return chunk

    while pos < len(view):
        (name_len,) = struct.unpack(">B", take(1))
        if name_len == 0:
            raise FramingError("empty header name")
        try:
            name = take(name_len).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FramingError("header name is not UTF-8") from exc
        (type_byte,) = struct.unpack(">B", take(1))
        try:
            kind = HeaderType(type_byte)
        except ValueError as exc:
            raise FramingError(f"unknown header type {type_byte}") from exc
        value: Any
        if kind == HeaderType.BOOL_TRUE:
            value = True
        elif kind == HeaderType.BOOL_FALSE:
            value = False
        elif kind in _INT_FORMATS:
            fmt = ">" + _INT_FORMATS[kind]
            (value,) = struct.unpack(fmt, take(struct.calcsize(fmt)))
        elif kind in (HeaderType.BYTE_BUF, HeaderType.STRING):
            (length,) = struct.unpack(">H", take(2))
            raw = take(length)
            if kind == HeaderType.STRING:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise FramingError(f"string header {name!r} is not UTF-8") from exc
            else:
                value = raw
        else:
            value = uuid.UUID(bytes=take(16))
        headers.append(Header(name, value, kind))
    return headers


def encode_message(headers: Iterable[Header], payload: bytes = b"") -> bytes:
    """Build one complete frame, both CRCs included."""
    header_bytes = encode_headers(headers)
    if len(header_bytes) > MAX_HEADERS_LEN:
        raise ValueError("headers exceed the event-stream limit")
    total = PRELUDE_LEN + len(header_bytes) + len(payload) + MESSAGE_CRC_LEN
    if total > MAX_MESSAGE_LEN:
        raise ValueError("message exceeds the event-stream limit")
    prelude = struct.pack(">II", total, len(header_bytes))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + header_bytes + bytes(payload)
    return body + struct.pack(">I", zlib.crc32(body))


def _check_prelude(prelude: bytes) -> tuple[int, int]:
    total, headers_len, prelude_crc = struct.unpack(">III", prelude)
    if zlib.crc32(prelude[:8]) != prelude_crc:
        raise FramingError("prelude CRC mismatch")
    if not MIN_MESSAGE_LEN <= total <= MAX_MESSAGE_LEN:
        raise FramingError(f"total length {total} out of range")
    if headers_len > min(MAX_HEADERS_LEN, total - MIN_MESSAGE_LEN):
        raise FramingError(f"headers length {headers_len} out of range")
    return total, headers_len


def decode_message(frame: bytes) -> Message:
    """Decode exactly one frame, verifying the prelude and message CRCs."""
    if len(frame) < MIN_MESSAGE_LEN:
        raise FramingError("frame shorter than prelude + CRC")
    total, headers_len = _check_prelude(frame[:PRELUDE_LEN])
    if len(frame) != total:
        raise FramingError(f"frame is {len(frame)} bytes, prelude says {total}")
    (message_crc,) = struct.unpack(">I", frame[-MESSAGE_CRC_LEN:])
    if zlib.crc32(frame[:-MESSAGE_CRC_LEN]) != message_crc:
        raise FramingError("message CRC mismatch")
    headers = decode_headers(frame[PRELUDE_LEN : PRELUDE_LEN + headers_len])
    return Message(headers, bytes(frame[PRELUDE_LEN + headers_len : -MESSAGE_CRC_LEN]))


class StreamDecoder:
    """Incremental decoder: feed socket bytes, get whole messages.

    The prelude CRC is checked as soon as 12 bytes are in, before trusting ``total_len``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Append ``data`` and return every message now complete (raises on a bad frame)."""
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= PRELUDE_LEN:
            total, _ = _check_prelude(bytes(self._buf[:PRELUDE_LEN]))
            if len(self._buf) < total:
                break
            frame = bytes(self._buf[:total])
            del self._buf[:total]
            out.append(decode_message(frame))
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered towards an incomplete frame."""
        return len(self._buf)


# --------------------------------------------------------------------------------------
# RPC constants
# --------------------------------------------------------------------------------------


class MessageType(enum.IntEnum):
    """``:message-type`` values (``awscrt.eventstream.rpc.MessageType``)."""

    APPLICATION_MESSAGE = 0
    APPLICATION_ERROR = 1
    PING = 2
    PING_RESPONSE = 3
    CONNECT = 4
    CONNECT_ACK = 5
    PROTOCOL_ERROR = 6
    INTERNAL_ERROR = 7


class MessageFlag(enum.IntFlag):
    """``:message-flags`` bits (``awscrt.eventstream.rpc.MessageFlag``)."""

    NONE = 0
    CONNECTION_ACCEPTED = 1
    TERMINATE_STREAM = 2


H_MESSAGE_TYPE = ":message-type"
H_MESSAGE_FLAGS = ":message-flags"
H_STREAM_ID = ":stream-id"
H_OPERATION = "operation"
H_VERSION = ":version"
H_CONTENT_TYPE = ":content-type"
H_SERVICE_MODEL_TYPE = "service-model-type"
RPC_VERSION = "0.1.0"
REJECT_GRACE_S = 2.0
CONTENT_TYPE_JSON = "application/json"
NAMESPACE = "aws.greengrass#"
SERVICE_NAME = NAMESPACE + "GreengrassCoreIPC"

# Operations of the GreengrassCoreIPC service (main.smithy plus later SDK additions).  Known but
# unimplemented ones get the nucleus's ServiceError; anything else is "Unsupported Operation".
MODEL_OPERATIONS = frozenset(
    {
        "AuthorizeClientDeviceAction", "CancelLocalDeployment", "CreateDebugPassword",
        "CreateLocalDeployment", "DeferComponentUpdate", "DeleteThingShadow",
        "GetClientDeviceAuthToken", "GetComponentDetails", "GetConfiguration",
        "GetLocalDeploymentStatus", "GetSecretValue", "GetThingShadow", "ListComponents",
        "ListLocalDeployments", "ListNamedShadowsForThing", "PauseComponent", "PublishToIoTCore",
        "PublishToTopic", "PutComponentMetric", "RestartComponent", "ResumeComponent",
        "SendConfigurationValidityReport", "StopComponent", "SubscribeToCertificateUpdates",
        "SubscribeToComponentUpdates", "SubscribeToConfigurationUpdate", "SubscribeToIoTCore",
        "SubscribeToIoTCoreConnectionStatus", "SubscribeToTopic",
        "SubscribeToValidateConfigurationUpdates", "UpdateConfiguration", "UpdateState",
        "UpdateThingShadow", "ValidateAuthorizationToken", "VerifyClientDeviceIdentity",
    }
)  # fmt: skip

# Streaming operations implemented here, with the shape their events are typed as.
_STREAM_EVENT_SHAPES = {
    "SubscribeToConfigurationUpdate": NAMESPACE + "ConfigurationUpdateEvents",
    "SubscribeToTopic": NAMESPACE + "SubscriptionResponseMessage",
    "SubscribeToIoTCore": NAMESPACE + "IoTCoreMessage",
}

_MISSING = object()


class IpcError(Exception):
    """A modelled error to send back, e.g. ``IpcError("ResourceNotFoundError", "Key not found")``.

    Raise it from a handler registered with :meth:`FakeNucleus.register_handler`; the client
    raises the SDK exception of the same shape name.
    """

    def __init__(self, shape: str, message: str, **fields: Any) -> None:
        super().__init__(f"{shape}: {message}")
        self.shape = shape
        self.message = message
        self.fields = fields

    def payload(self) -> dict[str, Any]:
        """The JSON error document (the SDK reads ``message`` and shape-specific members)."""
        return {"message": self.message, **self.fields}


class Call(NamedTuple):
    """One recorded request: the short operation name and the decoded request document.

    Every request to a modelled operation is recorded, including those answered with an error.

    Base64 blobs (``PublishToIoTCore.payload``, ``BinaryMessage.message``) are decoded to bytes.
    """

    operation: str
    request: dict[str, Any]


Handler = Callable[[dict[str, Any], str], dict[str, Any]]
# A built-in operation's result: the response document and an optional hook run after it is sent.
_Result = tuple[dict[str, Any], Callable[[], None] | None]


# --------------------------------------------------------------------------------------
# connection and stream state
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Stream:
    conn: _Connection
    stream_id: int
    operation: str
    component: str
    active: bool = False
    closed: bool = False
    filter: Any = None  # subscription parameters, per operation

    def send_event(self, payload: dict[str, Any]) -> bool:
        """Push one stream event; False if the stream is not (or no longer) deliverable."""
        shape = _STREAM_EVENT_SHAPES[self.operation]
        with self.conn.send_lock:
            if not self.active or self.closed:
                return False
            return self.conn.send_app(self.stream_id, shape, payload, MessageFlag.NONE)


class _Connection:
    """One accepted client socket, served by its own reader thread."""

    def __init__(self, server: FakeNucleus, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.send_lock = threading.RLock()
        self.component: str | None = None
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0  # clients number streams upwards; lower ids are finished ones
        self.rejected = False
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fake-nucleus-conn", daemon=True)

    # -- sending ------------------------------------------------------------------------
    def send(
        self,
        mtype: MessageType,
        flags: int,
        stream_id: int,
        extra: Iterable[Header] = (),
        payload: bytes = b"",
    ) -> bool:
        """Write one frame with the three RPC headers; False if the connection is gone."""
        headers = [
            Header.from_int32(H_MESSAGE_TYPE, int(mtype)),
            Header.from_int32(H_MESSAGE_FLAGS, int(flags)),
            Header.from_int32(H_STREAM_ID, stream_id),
            *extra,
        ]
        frame = encode_message(headers, payload)
        with self.send_lock:
            if self.closed.is_set():
                return False
            try:
                self.sock.sendall(frame)
            except OSError:
                self.close()
                return False
        return True

    def send_app(
        self,
        stream_id: int,
        shape: str,
        body: dict[str, Any],
        flags: int,
        mtype: MessageType = MessageType.APPLICATION_MESSAGE,
    ) -> bool:
        """Write a JSON application message/error typed ``shape`` (what the SDK dispatches on)."""
        extra = [
            Header.from_string(H_CONTENT_TYPE, CONTENT_TYPE_JSON),
            Header.from_string(H_SERVICE_MODEL_TYPE, shape),
        ]
        return self.send(mtype, flags, stream_id, extra, _json_bytes(body))

    def protocol_error(self, reason: str) -> None:
        """Report a connection-level error, then drop the connection (as aws-c-event-stream does)."""
        self.server._note_protocol_error(reason)
        self.send(
            MessageType.PROTOCOL_ERROR,
            0,
            0,
            [Header.from_string(H_CONTENT_TYPE, CONTENT_TYPE_JSON)],
            _json_bytes({"message": reason}),
        )
        self.close()

    def close(self) -> None:
        """Shut the socket down; shutdown() also wakes the reader thread blocked in recv()."""
        if self.closed.is_set():
            return
        self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- receiving ----------------------------------------------------------------------
    def _run(self) -> None:
        decoder = StreamDecoder()
        try:
            while not self.closed.is_set():
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                try:
                    messages = decoder.feed(data)
                except FramingError as exc:
                    self.protocol_error(f"malformed frame: {exc}")
                    break
                for message in messages:
                    self._dispatch(message)
                    if self.closed.is_set():
                        break
        finally:
            self.close()
            self.server._connection_gone(self)

    def _dispatch(self, msg: Message) -> None:
        mtype = msg.value(H_MESSAGE_TYPE, HeaderType.INT32)
        flags = msg.value(H_MESSAGE_FLAGS, HeaderType.INT32)
        stream_id = msg.value(H_STREAM_ID, HeaderType.INT32)
        if self.rejected:
            self.close()
            return
        if mtype is None or flags is None or stream_id is None:
            self.protocol_error("missing :message-type, :message-flags or :stream-id (int32)")
            return
        if self.component is None and mtype != MessageType.CONNECT:
            self.protocol_error("a CONNECT message must come first")
            return
        if mtype == MessageType.CONNECT:
            self._on_connect(msg)
        elif mtype == MessageType.PING:
            echo = [h for h in msg.headers if not h.name.startswith(":")]
            self.send(MessageType.PING_RESPONSE, 0, 0, echo, msg.payload)
        elif mtype == MessageType.PING_RESPONSE:
            self.server._note_ping_response(msg)
        elif mtype == MessageType.APPLICATION_MESSAGE and stream_id > 0:
            self._on_application_message(msg, stream_id, flags, msg.value(H_OPERATION, HeaderType.STRING))
        else:
            self.protocol_error(f"unexpected message type {mtype} on stream {stream_id}")

    def _on_connect(self, msg: Message) -> None:
        if self.component is not None:
            self.protocol_error("duplicate CONNECT")
            return
        self.server._note_connect(msg)
        component = None
        if msg.value(H_VERSION, HeaderType.STRING) == RPC_VERSION:
            try:
                token = json.loads(msg.payload.decode("utf-8")).get("authToken")
            except (ValueError, AttributeError):
                token = None
            component = self.server._authenticate(token)
        if component is None:
            self.server._note_rejected()
            self.send(MessageType.CONNECT_ACK, MessageFlag.NONE, 0)
            # Let the client read the refusal and hang up itself: closing at once can reach it as
            # a reset (Linux resets an AF_UNIX peer when unread data is dropped) instead of the
            # AccessDeniedError it should raise.  Give it a moment, then close regardless.
            self.rejected = True
            self.sock.settimeout(REJECT_GRACE_S)
            return
        self.component = component
        self.send(MessageType.CONNECT_ACK, MessageFlag.CONNECTION_ACCEPTED, 0)

    def _on_application_message(
        self, msg: Message, stream_id: int, flags: int, operation: str | None
    ) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            if flags & MessageFlag.TERMINATE_STREAM:
                self.server._close_stream(stream)
            # No Greengrass operation takes client stream events; like the nucleus, ignore them.
            return
        if stream_id <= self.last_stream_id or flags & MessageFlag.TERMINATE_STREAM:
            # A message for a stream we already finished (e.g. a late close), or a client
            # hanging up before we ever saw a request: nothing to do, as in the nucleus.
            return
        self.last_stream_id = stream_id
        if operation is None:
            self.protocol_error(f"stream {stream_id} opened without an operation header")
            return
        assert self.component is not None
        short = operation.removeprefix(NAMESPACE)
        stream = _Stream(self, stream_id, short, self.component)
        self.streams[stream_id] = stream
        self.server._handle_request(stream, operation, msg)


def _json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------------------
# configuration helpers
# --------------------------------------------------------------------------------------

KeyPath = tuple[str, ...]


def _lookup(tree: dict[str, Any], path: KeyPath) -> Any:
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _leaf_paths(value: Any, prefix: KeyPath) -> list[KeyPath]:
    if isinstance(value, dict) and value:
        out: list[KeyPath] = []
        for key, child in value.items():
            out += _leaf_paths(child, (*prefix, key))
        return out
    return [prefix]


def _changed_paths(old: Any, new: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """Key paths whose value changed, was added or was removed (one per leaf, like the nucleus)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[KeyPath] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _changed_paths(old.get(key, _MISSING), new.get(key, _MISSING), (*prefix, key))
        return out
    if old is _MISSING and new is _MISSING:
        return []
    if type(old) is type(new) and old == new:
        return []
    paths: list[KeyPath] = []
    for side in (old, new):
        if side is not _MISSING:
            paths += [p for p in _leaf_paths(side, prefix) if p not in paths]
    return paths


def _deep_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with ``+`` and ``#`` (used for local pub/sub and IoT Core)."""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


# --------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------


class FakeNucleus:
    """Threaded Greengrass IPC server on a Unix socket, for the real ``awsiotsdk`` client.

    Use it as a context manager::

        with FakeNucleus(configuration={"Threshold": 0.5}) as nucleus:
            for key, value in nucleus.env().items():
                monkeypatch.setenv(key, value)  # or Popen(..., env={**os.environ, **nucleus.env()})
            ...  # run code that builds GreengrassCoreIPCClientV2()
            assert nucleus.states() == ["RUNNING"]
            nucleus.set_configuration(None, ["Threshold"], 0.7)  # a config-only deployment

    Args:
        socket_path: where to listen; by default ``ipc.socket`` in a fresh short temp dir
            (AF_UNIX paths are limited to 107 bytes, which pytest's tmp_path can exceed).
        component_name: identity of the default component (the one ``env()`` describes).
        configuration: that component's initial configuration (deep-copied).
        svcuid: its auth token; random by default.
        thing_name / region: values for the ``AWS_IOT_THING_NAME`` / ``AWS_REGION`` env vars.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        component_name: str = "com.example.EdgeRuntime",
        configuration: dict[str, Any] | None = None,
        svcuid: str | None = None,
        thing_name: str = "edge-device-1",
        region: str = "eu-west-1",
    ) -> None:
        self._own_dir: str | None = None
        if socket_path is None:
            self._own_dir = tempfile.mkdtemp(prefix="ggipc-")
            socket_path = os.path.join(self._own_dir, "ipc.socket")
        self.socket_path = os.fspath(socket_path)
        if len(self.socket_path.encode()) > 107:
            raise ValueError(f"Unix socket path too long (max 107 bytes): {self.socket_path}")
        self.component_name = component_name
        self.thing_name = thing_name
        self.region = region

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._tokens: dict[str, str] = {}
        self._config: dict[str, dict[str, Any]] = {}
        self._modtime: dict[str, dict[KeyPath, float]] = {}
        self._calls: list[Call] = []
        self._states: dict[str, list[str]] = {}
        self._handlers: dict[str, Handler] = {}
        self._injected: dict[str, list[IpcError]] = {}
        self._subscriptions: list[_Stream] = []
        self._connections: set[_Connection] = set()
        self.protocol_errors: list[str] = []
        """Reasons for every connection dropped for a protocol violation (bad CRC etc.)."""
        self.rejected_connects = 0
        """CONNECT attempts refused (bad token or version)."""
        self.ping_responses: list[Message] = []
        """PING_RESPONSE messages received from clients."""
        self.connect_messages: list[Message] = []
        """Every CONNECT message received, accepted or not (headers as the client encoded them)."""

        self.svcuid = self.add_component(component_name, configuration, svcuid=svcuid)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> FakeNucleus:
        """Bind and start accepting; the socket exists when this returns."""
        if self._listener is not None:
            return self
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(16)
        listener.settimeout(0.1)  # lets the accept loop notice stop() promptly
        self._listener = listener
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="fake-nucleus-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, drop every connection, join threads and remove the socket."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        self.drop_connections()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def __enter__(self) -> FakeNucleus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop_connections(self) -> None:
        """Close every client connection (simulates a nucleus restart; the server keeps listening)."""
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn.close()
        for conn in conns:
            if conn.thread is not threading.current_thread():
                conn.thread.join(timeout=5)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            sock.settimeout(None)
            conn = _Connection(self, sock)
            with self._lock:
                self._connections.add(conn)
            conn.thread.start()

    def _connection_gone(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
            for stream in list(conn.streams.values()):
                self._close_stream(stream)
            self._changed.notify_all()

    # -- identity -----------------------------------------------------------------------
    def add_component(
        self, name: str, configuration: dict[str, Any] | None = None, *, svcuid: str | None = None
    ) -> str:
        """Register another component (its own token and configuration); returns its SVCUID."""
        token = svcuid or secrets.token_hex(16)
        with self._lock:
            self._tokens[token] = name
            self._config[name] = copy.deepcopy(configuration or {})
            self._modtime[name] = {}
        return token

    def env(self, component: str | None = None) -> dict[str, str]:
        """Environment variables the nucleus gives a component process.

        ``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and ``SVCUID`` are what
        ``GreengrassCoreIPCClientV2()`` reads; the rest mirror other variables the nucleus
        sets.  The token exchange service's ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` /
        ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` are left out: there is no TES here, and a URI
        pointing nowhere would send AWS SDKs looking for credentials.
        """
        name = component or self.component_name
        with self._lock:
            token = next(t for t, c in self._tokens.items() if c == name)
        return {
            "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": self.socket_path,
            "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH": self.socket_path,
            "SVCUID": token,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_IOT_THING_NAME": self.thing_name,
        }

    def _authenticate(self, token: Any) -> str | None:
        with self._lock:
            return self._tokens.get(token) if isinstance(token, str) else None

    def _note_connect(self, msg: Message) -> None:
        with self._lock:
            self.connect_messages.append(msg)

    def _note_rejected(self) -> None:
        with self._lock:
            self.rejected_connects += 1
            self._changed.notify_all()

    def _note_protocol_error(self, reason: str) -> None:
        with self._lock:
            self.protocol_errors.append(reason)
            self._changed.notify_all()

    def _note_ping_response(self, msg: Message) -> None:
        with self._lock:
            self.ping_responses.append(msg)
            self._changed.notify_all()

    # -- inspection ---------------------------------------------------------------------
    @property
    def calls(self) -> list[Call]:
        """Snapshot of every request received, in order."""
        with self._lock:
            return list(self._calls)

    def calls_for(self, operation: str) -> list[dict[str, Any]]:
        """Request documents of one operation (short name, e.g. ``"PublishToIoTCore"``)."""
        return [c.request for c in self.calls if c.operation == operation]

    def wait_for_call(
        self, operation: str, predicate: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Block until a matching request has arrived (code under test often runs in a thread)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for call in self._calls:
                    if call.operation == operation and (predicate is None or predicate(call.request)):
                        return call.request
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {operation} call matched within {timeout}s")
                self._changed.wait(remaining)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block until ``condition()`` (evaluated under the server lock) is true."""
        with self._changed:
            if not self._changed.wait_for(condition, timeout):
                raise TimeoutError(f"condition not met within {timeout}s")

    def states(self, component: str | None = None) -> list[str]:
        """Every state the component reported with UpdateState, oldest first."""
        with self._lock:
            return list(self._states.get(component or self.component_name, []))

    def configuration(self, component: str | None = None) -> dict[str, Any]:
        """Deep copy of a component's current configuration."""
        with self._lock:
            return copy.deepcopy(self._config[component or self.component_name])

    @property
    def connection_count(self) -> int:
        """Client connections currently open (authenticated or not)."""
        with self._lock:
            return len(self._connections)

    def subscriber_count(self, operation: str | None = None) -> int:
        """Active subscriptions, optionally of one operation (e.g. ``"SubscribeToTopic"``)."""
        with self._lock:
            return sum(1 for s in self._subscriptions if s.active and operation in (None, s.operation))

    # -- test controls ------------------------------------------------------------------
    def set_configuration(
        self, component: str | None, key_path: Iterable[str], value: Any, *, merge: bool = False
    ) -> list[list[str]]:
        """Change configuration as a deployment would, and notify subscribers.

        ``key_path`` ``[]`` addresses the whole configuration (``value`` must then be a dict).
        ``merge=True`` deep-merges a dict instead of replacing.  Returns the changed key paths
        (each sent as one ``ConfigurationUpdateEvents`` to matching subscribers).
        """
        name = component or self.component_name
        path = tuple(key_path)
        with self._lock:
            if name not in self._config:
                self.add_component(name)
            old = copy.deepcopy(self._config[name])
            if not path:
                if not isinstance(value, dict):
                    raise TypeError("the whole configuration must be a dict")
                if merge:
                    _deep_merge(self._config[name], value)
                else:
                    self._config[name] = copy.deepcopy(value)
            else:
                parent = self._config[name]
                for key in path[:-1]:
                    if not isinstance(parent.get(key), dict):
                        parent[key] = {}
                    parent = parent[key]
                if merge and isinstance(value, dict) and isinstance(parent.get(path[-1]), dict):
                    _deep_merge(parent[path[-1]], value)
                else:
                    parent[path[-1]] = copy.deepcopy(value)
            changed = _changed_paths(old, self._config[name])
            now_ms = time.time() * 1000
            for p in changed:
                self._modtime[name][p] = now_ms
        self._notify_config(name, changed)
        return [list(p) for p in changed]

    def register_handler(self, operation: str, handler: Handler) -> None:
        """Serve a unary operation with ``handler(request, component) -> response dict``.

        Raise :class:`IpcError` inside it to answer with a modelled error.  Overrides the
        built-in behaviour of that operation.
        """
        with self._lock:
            self._handlers[operation.removeprefix(NAMESPACE)] = handler

    def inject_error(
        self,
        operation: str,
        shape: str = "ServiceError",
        message: str = "injected failure",
        *,
        times: int = 1,
        **fields: Any,
    ) -> None:
        """Fail the next ``times`` calls of ``operation`` with a modelled error (still recorded)."""
        with self._lock:
            queue = self._injected.setdefault(operation.removeprefix(NAMESPACE), [])
            queue.extend(IpcError(shape, message, **fields) for _ in range(times))

    def deliver_iot_core_message(self, topic: str, payload: bytes) -> int:
        """Deliver a cloud MQTT message to matching SubscribeToIoTCore streams; returns how many."""
        event = {"message": {"topicName": topic, "payload": base64.b64encode(payload).decode()}}
        with self._lock:
            targets = [
                s
                for s in self._subscriptions
                if s.operation == "SubscribeToIoTCore" and _topic_matches(s.filter, topic)
            ]
        return sum(1 for s in targets if s.send_event(event))

    def publish_local(
        self,
        topic: str,
        *,
        json_message: Any = None,
        binary_message: bytes | None = None,
        source: str = "aws.greengrass.FakePublisher",
    ) -> int:
        """Publish on local pub/sub as another component would; returns subscribers reached."""
        return self._fan_out_local(topic, json_message, binary_message, source)

    def send_ping(self, headers: Iterable[Header] = (), payload: bytes = b"") -> int:
        """Send a server-initiated PING to every authenticated client (returns how many).

        The SDK hands it to ``LifecycleHandler.on_ping(headers, payload)``, which makes it a
        way to check this encoder against the C decoder.
        """
        with self._lock:
            conns = [c for c in self._connections if c.component is not None]
        headers = list(headers)
        return sum(1 for c in conns if c.send(MessageType.PING, 0, 0, headers, payload))

    # -- request handling ---------------------------------------------------------------
    def _handle_request(self, stream: _Stream, operation: str, msg: Message) -> None:
        conn = stream.conn
        short = stream.operation
        if not operation.startswith(NAMESPACE) or short not in MODEL_OPERATIONS:
            # What the eventstream-rpc server does for a name outside the service model.
            body = {"error": "Unsupported Operation", "message": f"{operation} is an unsupported operation."}
            conn.send(
                MessageType.APPLICATION_ERROR,
                MessageFlag.TERMINATE_STREAM,
                stream.stream_id,
                [Header.from_string(H_CONTENT_TYPE, CONTENT_TYPE_JSON)],
                _json_bytes(body),
            )
            self._forget_stream(stream)
            return
        try:
            request = json.loads(msg.payload.decode("utf-8")) if msg.payload else {}
            if not isinstance(request, dict):
                raise ValueError("request is not a JSON object")
        except ValueError:
            self._send_error(stream, IpcError("InvalidArgumentsError", "request is not a JSON object"))
            return
        record = self._decoded_for_record(short, request)
        with self._lock:
            self._calls.append(Call(short, record))
            injected = self._injected.get(short)
            error = injected.pop(0) if injected else None
            custom = self._handlers.get(short)
            self._changed.notify_all()
        try:
            if error is not None:
                raise error
            if custom is not None:
                response = custom(copy.deepcopy(record), stream.component)
                after: Callable[[], None] | None = None
            else:
                builtin = getattr(self, f"_op_{short}", None)
                if builtin is None:
                    raise IpcError("ServiceError", f"Operation {operation} is not supported by Greengrass")
                response, after = builtin(stream, request)
        except IpcError as exc:
            self._send_error(stream, exc)
            return
        except Exception as exc:  # a bug in a handler must not kill the connection thread
            self._send_error(stream, IpcError("ServiceError", f"{type(exc).__name__}: {exc}"))
            return
        shape = f"{NAMESPACE}{short}Response"
        streaming = short in _STREAM_EVENT_SHAPES and custom is None
        if streaming:
            # Register first, but inactive: the client may act on the response at once (and the
            # test then publish), so the stream must be findable by the time the response is out.
            with self._lock:
                self._subscriptions.append(stream)
        with conn.send_lock:
            flags = MessageFlag.NONE if streaming else MessageFlag.TERMINATE_STREAM
            conn.send_app(stream.stream_id, shape, response, flags)
            if streaming:
                stream.active = True  # events flow only after the initial response (send_lock orders them)
        if streaming:
            with self._lock:
                self._changed.notify_all()
        else:
            self._forget_stream(stream)
        if after is not None:
            after()

    def _send_error(self, stream: _Stream, error: IpcError) -> None:
        stream.conn.send_app(
            stream.stream_id,
            NAMESPACE + error.shape,
            error.payload(),
            MessageFlag.TERMINATE_STREAM,
            MessageType.APPLICATION_ERROR,
        )
        self._forget_stream(stream)

    def _forget_stream(self, stream: _Stream) -> None:
        stream.closed = True
        stream.conn.streams.pop(stream.stream_id, None)

    def _close_stream(self, stream: _Stream) -> None:
        with self._lock:
            stream.closed = True
            stream.conn.streams.pop(stream.stream_id, None)
            if stream in self._subscriptions:
                self._subscriptions.remove(stream)
            self._changed.notify_all()

    @staticmethod
    def _decoded_for_record(operation: str, request: dict[str, Any]) -> dict[str, Any]:
        record = copy.deepcopy(request)
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            if operation == "PublishToIoTCore":
                for key in ("payload", "correlationData"):
                    if isinstance(record.get(key), str):
                        record[key] = base64.b64decode(record[key])
            elif operation == "PublishToTopic":
                binary = (record.get("publishMessage") or {}).get("binaryMessage")
                if isinstance(binary, dict) and isinstance(binary.get("message"), str):
                    binary["message"] = base64.b64decode(binary["message"])
        return record

    # -- built-in operations: each returns (response, optional after-send hook) ---------

    def _op_GetConfiguration(self, stream: _Stream, req: dict[str, Any]) -> _Result:
        name = req.get("componentName") or stream.component
        path = tuple(req.get("keyPath") or ())
        with self._lock:
            if name not in self._config:
                raise IpcError("ResourceNotFoundError", "Key not found")
            node = _lookup(self._config[name], path)
            if node is _MISSING:
                raise IpcError("ResourceNotFoundError", "Key not found")
            # The nucleus returns maps as-is and wraps a leaf as {leafName: value}.
            value = copy.deepcopy(node) if isinstance(node, dict) else {path[-1]: copy.deepcopy(node)}
        return {"componentName": name, "value": value}, None

    def _op_UpdateConfiguration(self, stream: _Stream, req: dict[str, Any]) -> _Result:
        name = stream.component  # a component may only update its own configuration
        timestamp = req.get("timestamp")
        value = req.get("valueToMerge")
        path = tuple(req.get("keyPath") or ())
        if timestamp is None:
            raise IpcError("InvalidArgumentsError", "Timestamp is required")
        if value is None:
            raise IpcError("InvalidArgumentsError", "ValueToMerge is required")
        top_keys = path[:1] if path else tuple(value) if isinstance(value, dict) else ()
        if "accessControl" in top_keys:
            raise IpcError(
                "InvalidArgumentsError", "Config update is not allowed for following fields [accessControl]"
            )
        update_ms = float(timestamp) * 1000.0  # the SDK sends epoch seconds
        with self._lock:
            config = self._config[name]
            newest = max((t for p, t in self._modtime[name].items() if p[: len(path)] == path), default=0.0)
            if path and _lookup(config, path) is not _MISSING and update_ms < newest:
                raise IpcError(
                    "FailedUpdateConditionCheckError",
                    "Proposed timestamp is older than the config's latest modified timestamp",
                )
            old = copy.deepcopy(config)
            node = _lookup(config, path)
            if path and node is not _MISSING and not isinstance(node, dict):
                _lookup(config, path[:-1])[path[-1]] = copy.deepcopy(value)  # a leaf is replaced
            else:
                if not isinstance(value, dict):
                    raise IpcError("InvalidArgumentsError", "valueToMerge must be an object here")
                parent = config
                for key in path:
                    if not isinstance(parent.get(key), dict):
                        parent[key] = {}
                    parent = parent[key]
                _deep_merge(parent, value)
            changed = _changed_paths(old, config)
            for p in changed:
                self._modtime[name][p] = update_ms
        return {}, lambda: self._notify_config(name, changed)

    def _op_SubscribeToConfigurationUpdate(self, stream: _Stream, req: dict[str, Any]) -> _Result:
        name = req.get("componentName") or stream.component
        path = tuple(req.get("keyPath") or ())
        with self._lock:
            if name not in self._config or _lookup(self._config[name], path) is _MISSING:
                raise IpcError("ResourceNotFoundError", "Key not found")
        stream.filter = (name, path)
        return {}, None

    def _notify_config(self, component: str, changed: list[KeyPath]) -> None:
        with self._lock:
            subs = [
                s
                for s in self._subscriptions
                if s.operation == "SubscribeToConfigurationUpdate" and s.filter[0] == component
            ]
        for changed_path in changed:
            event = {"configurationUpdateEvent": {"componentName": component, "keyPath": list(changed_path)}}
            for sub in subs:
                sub_path = sub.filter[1]
                if changed_path[: len(sub_path)] == sub_path or sub_path[: len(changed_path)] == changed_path:
                    sub.send_event(event)

    def _op_UpdateState(self, stream: _Stream, req: dict[str, Any]) -> _Result:
        state = req.get("state")
        if state not in ("RUNNING", "ERRORED"):
            raise IpcError("InvalidArgumentsError", f"state must be RUNNING or ERRORED, got {state!r}")
        with self._lock:
            self._states.setdefault(stream.component, []).append(state)
            self._changed.notify_all()
        return {}, None

    def _op_PublishToTopic(self, stream: _Stream, req: dict[str, Any]) -> _Result:
        topic = req.get("topic")
        if not topic:
            raise IpcError("InvalidArgumentsError", "Publish topic must not be null")
        if any(ch in topic for ch in "+#*"):
            raise IpcError("InvalidArgumentsError", "Publish topic must not contain a wildcard.")
        message = req.get("publishMessage") or {}
        json_part = message.get("jsonMessage")
        binary_part = message.get("binaryMessage")
        if (json_part is None) == (binary_part is None):
            raise IpcError(
                "InvalidArgumentsError", "publishMessage needs exactly one of jsonMessage, binaryMessage"
            )
        json_message = json_part.get("message") if json_part is not None else None
        binary = base64.b64decode(binary_part.get("message", "")) if binary_part is not None else None
        return {}, lambda: self._fan_out_local(topic, json_message, binary, stream.component)

    def _op_SubscribeToTopic(self, stream: _Stream, req: dict[str, Any]) -> _Result:
        topic = req.get("topic")
        if not topic:
            raise IpcError("InvalidArgumentsError", "Subscribe topic must not be empty")
        mode = req.get("receiveMode")
        if mode is None:  # the nucleus's default depends on whether the filter has a wildcard
            wildcard = any(part in ("+", "#") for part in topic.split("/"))
            mode = "RECEIVE_MESSAGES_FROM_OTHERS" if wildcard else "RECEIVE_ALL_MESSAGES"
        stream.filter = (topic, mode)
        return {}, None

    def _fan_out_local(self, topic: str, json_message: Any, binary: bytes | None, source: str) -> int:
        context = {"topic": topic}
        if binary is not None:
            event = {"binaryMessage": {"message": base64.b64encode(binary).decode(), "context": context}}
        else:
            event = {"jsonMessage": {"message": json_message, "context": context}}
        with self._lock:
            targets = [
                s
                for s in self._subscriptions
                if s.operation == "SubscribeToTopic"
                and _topic_matches(s.filter[0], topic)
                and not (s.filter[1] == "RECEIVE_MESSAGES_FROM_OTHERS" and s.component == source)
            ]
        return sum(1 for s in targets if s.send_event(event))

    def _op_PublishToIoTCore(self, stream: _Stream, req: dict[str, Any]) -> _Result:
        if not req.get("topicName"):
            raise IpcError("InvalidArgumentsError", "topicName is required")
        if req.get("qos") not in ("0", "1"):
            raise IpcError("InvalidArgumentsError", f"qos must be '0' or '1', got {req.get('qos')!r}")
        try:
            base64.b64decode(req.get("payload", ""), validate=True)
        except ValueError as exc:
            raise IpcError("InvalidArgumentsError", "payload is not base64") from exc
        return {}, None

    def _op_SubscribeToIoTCore(self, stream: _Stream, req: dict[str, Any]) -> _Result:
        if not req.get("topicName"):
            raise IpcError("InvalidArgumentsError", "topicName is required")
        if req.get("qos") not in ("0", "1"):
            raise IpcError("InvalidArgumentsError", f"qos must be '0' or '1', got {req.get('qos')!r}")
        stream.filter = req["topicName"]
        return {}, None


def iter_messages(sock: socket.socket, decoder: StreamDecoder | None = None) -> Iterator[Message]:
    """Yield messages read from a raw socket until EOF (for protocol-level tests)."""
    decoder = decoder or StreamDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            return
        yield from decoder.feed(data)
