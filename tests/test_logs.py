"""Log lines are one record each, whatever a sender puts in a file name."""

from __future__ import annotations

import io
import json
import logging

from edge_runtime.logs import JsonFormatter, TextFormatter, event


def _log_with(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-logs-{id(formatter)}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, buffer


FORGED = "x.jpeg\n2026-11-30 03:00:00,000 ERROR   edge_runtime.service: forged\r\x1b[2K"


def test_a_newline_in_a_file_name_cannot_forge_a_text_log_line():
    logger, buffer = _log_with(TextFormatter())
    event(logger, "received", "received %s", FORGED, file=FORGED)
    text = buffer.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "x.jpeg\\n2026-11-30" in text and "\\r\\x1b[2K" in text
    assert text.count("forged") == 2  # in the message and in the field, both escaped


def test_tracebacks_keep_their_lines_and_json_lines_stay_one_object():
    logger, buffer = _log_with(TextFormatter())
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed on %s", FORGED)
    lines = buffer.getvalue().splitlines()
    assert lines[0].endswith("\\r\\x1b[2K") and lines[1].startswith("Traceback")
    logger, buffer = _log_with(JsonFormatter())
    event(logger, "received", "received %s", FORGED, file=FORGED)
    (line,) = buffer.getvalue().splitlines()
    assert json.loads(line)["file"] == FORGED
