"""The remote calls a management host may make (Azure IoT Edge direct methods): read-only, by design.

An operator of a fleet can ask a box how it is (``health``), whether its model
still gives the build machine's answers on this CPU (``model.verify``) and
whether its journal is sound (``journal.check``) without a shell on the box;
the answers are those of ``edge-runtime health``, ``edge-runtime model
verify`` and ``edge-runtime journal check``. Nothing here changes state: a call
that would (retry a quarantined scan, switch the model, reset drift) is refused
with 405, because such changes go through a deployment, where they are
reviewed, versioned and visible in the twin. A method name the module does not
know gets 404 with the list of those it does.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conformance import verify_backend
from .errors import EdgeRuntimeError, code_in_line
from .journal_integrity import check_journal
from .pipeline import ScanAnalyzer

__all__ = ["METHODS", "RemoteMethods", "public_health"]

log = logging.getLogger(__name__)

#: Method name -> what it answers (the 404 answer lists them).
METHODS = {
    "health": "the status snapshot (edge-runtime health)",
    "model.verify": "the conformance check of the running model on this CPU (edge-runtime model verify); "
    'payload {"backend": NAME} checks another installed backend',
    "journal.check": "the journal's integrity check, read-only (edge-runtime journal check)",
}
#: Names an operator might try that would change state: refused with why (405), not "unknown".
_STATE_CHANGING = ("restart", "reset", "retry", "discard", "switch", "set", "delete", "purge")


def public_health(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The status snapshot as it may leave the box: the last error by its code only.

    ``last_error`` starts with a scan reference or a message id (``<subject>: <code>:
    <fixed text>``), which stays on the box, as in the Greengrass health report.
    """
    public = dict(snapshot)
    public["last_error_code"] = code_in_line(public.pop("last_error", None))
    return public


class RemoteMethods:
    """Answers :data:`METHODS`; built by the service from its own parts (readings, not copies)."""

    def __init__(
        self,
        *,
        health: Callable[[], dict[str, Any]],
        analyzer: Callable[[], ScanAnalyzer],
        journal_path: Callable[[], Path],
        threads: Callable[[], int],
    ) -> None:
        self._health = health
        self._analyzer = analyzer
        self._journal_path = journal_path
        self._threads = threads
        #: One conformance run at a time: it runs the model on every reference image, and a
        #: second one on a small box would only slow scans and the first run down.
        self._verifying = threading.Lock()

    def call(self, name: str, payload: Any) -> tuple[int, Any]:
        """(status, answer) for one call; never raises for a caller's mistake (4xx) or a failed check."""
        if name == "health":
            return 200, public_health(self._health())
        if name == "model.verify":
            return self._model_verify(payload)
        if name == "journal.check":
            return self._journal_check()
        if set(re.split(r"[^a-z]+", name.lower())) & set(_STATE_CHANGING):
            return 405, {
                "error": f"{name!r} would change the box's state; direct methods here are read-only. "
                "Change the box through a deployment (the module twin's desired properties).",
                "methods": METHODS,
            }
        return 404, {"error": f"no direct method {name!r} on this module", "methods": METHODS}

    def _model_verify(self, payload: Any) -> tuple[int, Any]:
        analyzer = self._analyzer()
        backend = analyzer.backend.name
        if isinstance(payload, dict) and payload.get("backend"):
            backend = str(payload["backend"])
        elif payload not in (None, {}, ""):
            return 400, {"error": 'payload must be empty or {"backend": NAME}'}
        if not self._verifying.acquire(blocking=False):
            return 409, {"error": "model.verify is already running on this box; call again when it ends"}
        try:
            report = verify_backend(analyzer.bundle, backend, threads=self._threads())
        except EdgeRuntimeError as exc:
            return 400, {"error": exc.message, "action": exc.action, "code": exc.code}
        finally:
            self._verifying.release()
        if report is None:
            return 200, {
                "passed": None,
                "error": f"model {analyzer.bundle.name} {analyzer.bundle.version} has no conformance "
                "reference set (bundles before 0.2.0): its answers on this CPU cannot be checked",
            }
        log.info("direct method model.verify: %s %s", backend, "passed" if report.passed else "FAILED")
        return 200, {"passed": report.passed, "explanation": report.explain(), "report": report.to_dict()}

    def _journal_check(self) -> tuple[int, Any]:
        try:
            report = check_journal(self._journal_path())
        except EdgeRuntimeError as exc:
            return 500, {"healthy": False, "error": exc.message, "action": exc.action, "code": exc.code}
        return 200, {"healthy": True, "report": report.to_dict()}
