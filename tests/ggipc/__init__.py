"""A stand-in Greengrass nucleus IPC server for tests (see :mod:`ggipc.server`).

The real nucleus cannot be installed here, so runtime tests point the real ``awsiotsdk``
client at :class:`FakeNucleus`, which speaks the same event-stream RPC protocol over a
Unix domain socket.
"""

from ggipc.server import (
    Call,
    FakeNucleus,
    FramingError,
    Header,
    HeaderType,
    IpcError,
    Message,
    MessageFlag,
    MessageType,
    StreamDecoder,
    decode_message,
    encode_message,
)

__all__ = [
    "Call",
    "FakeNucleus",
    "FramingError",
    "Header",
    "HeaderType",
    "IpcError",
    "Message",
    "MessageFlag",
    "MessageType",
    "StreamDecoder",
    "decode_message",
    "encode_message",
]
