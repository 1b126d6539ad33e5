"""Logging set-up for the service entry points.

Library modules only create named loggers; this module, called from the CLI,
decides the format. In JSON mode every line is one event object, so the
Greengrass component log (which captures stdout/stderr) can be searched by
``event``, ``file`` or ``sha256``::

    {"ts": "...Z", "level": "INFO", "logger": "edge_runtime.service",
     "event": "inferred", "file": "IM-0001.jpeg", "duration_ms": 41.2, ...}

Events per scan: received, decoded, inferred, published, quarantined,
duplicate. Pixel values and patient data are never logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from .privacy import REDACTOR

__all__ = ["configure_logging", "escape_control", "event"]

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        data: dict[str, Any] = {
            "ts": ts + "Z",
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, "event", None)
        if event:
            data["event"] = event
        data["msg"] = REDACTOR.scrub(record.getMessage())
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update({k: REDACTOR.scrub(v) if isinstance(v, str) else v for k, v in fields.items()})
        if record.exc_info:
            data["exception"] = REDACTOR.scrub(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


#: C0/C1 control characters (and DEL): a file name holding a newline must not forge a log line.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def escape_control(text: str) -> str:
    """``text`` with control characters written as escapes (one record stays one line)."""
    return text.translate(_CONTROL)


class TextFormatter(logging.Formatter):
    """One line per record for people; values from scans (file names) have control characters escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)  # a traceback after the line keeps its own line breaks
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={escape_control(str(v))}" for k, v in fields.items())
        return REDACTOR.scrub(line)


def _drop_paho_retry_chatter(record: logging.LogRecord) -> bool:
    """paho logs "Client is not connected" at ERROR on every retry while the broker is down."""
    return not record.getMessage().startswith("Client is not connected")


def configure_logging(level: str = "INFO", fmt: str = "json", *, redact_names: bool = True) -> None:
    """Configure the root logger once, for the CLI (never call from library code).

    ``redact_names``: scans' file names are written as their references
    (``Privacy.LogFileNames`` false, the default), because logs may leave the box.
    """
    REDACTOR.enabled = redact_names
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # paho's own chatter ("Client is not connected" on every retry) only in DEBUG; its errors
    # always (the MQTT sink also logs connection changes in words an admin can act on).
    paho = logging.getLogger("edge_runtime.mqtt")
    paho.setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    if level != "DEBUG":
        paho.addFilter(_drop_paho_retry_chatter)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    logging.captureWarnings(True)


def event(
    logger: logging.Logger, name: str, msg: str, *args: Any, level: int = logging.INFO, **fields: Any
) -> None:
    """Log one pipeline event with structured fields (formatting is deferred)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, *args, extra={"event": name, "fields": fields})
