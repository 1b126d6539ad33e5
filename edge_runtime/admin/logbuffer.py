"""The last log lines, in memory, for the admin page's Logs view.

Installed on the ``edge_runtime`` logger by the service while it runs. Each
line is scrubbed when it is written, as the service's own log is: the names
of scans in flight become their references whatever ``Privacy.LogFileNames``
says (the page is not the place an admin opts into names), and control
characters are escaped so one record stays one line.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from ..logs import escape_control
from ..privacy import REDACTOR

__all__ = ["LogLine", "RecentLogs"]

#: Event fields that may hold a file's name or path (patient names): never on the page, whatever
#: Privacy.LogFileNames lets the service log say.
_NAMING_FIELDS = frozenset({"file", "original", "moved_to", "reason", "path", "folder"})


@dataclass(frozen=True)
class LogLine:
    time_utc: str
    level: str
    logger: str
    text: str


class RecentLogs(logging.Handler):
    """A bounded buffer of scrubbed log lines (oldest dropped first)."""

    def __init__(self, capacity: int = 300, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            fields = getattr(record, "fields", None)
            if isinstance(fields, dict):
                extra = " ".join(
                    f"{k}={v}" for k, v in fields.items() if v is not None and k not in _NAMING_FIELDS
                )
                text = f"{text} [{extra}]" if extra else text
            if record.exc_info and record.exc_info[0] is not None:
                text = f"{text} ({record.exc_info[0].__name__}; traceback in the service log)"
            line = LogLine(
                datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%d %H:%M:%S"),
                record.levelname,
                record.name.removeprefix("edge_runtime."),
                escape_control(REDACTOR.scrub_always(text)),
            )
        except Exception:  # a log line that cannot be formatted must not break the caller
            self.handleError(record)
            return
        with self._guard:
            self._lines.append(line)

    def lines(self, limit: int | None = None) -> list[LogLine]:
        """The newest ``limit`` lines (all by default), newest last."""
        with self._guard:
            lines = list(self._lines)
        return lines if limit is None else lines[-limit:]

    def resize(self, capacity: int) -> None:
        with self._guard:
            self._lines = deque(self._lines, maxlen=capacity)
