"""Outcomes: the one place where what happened to a scan becomes journal records and files.

Three endings, each first committed to the journal and only then done to
the file, so a crash between the two is finished on the next start:

* **result**: the result and one outbox row per sink, in one transaction;
  then the source disposes of the file (deleted, or moved to ``processed/``);
* **duplicate**: the content (or SOP instance) already has a result: the file
  is disposed of, nothing is published again;
* **quarantine**: ``quarantine/NAME`` plus ``NAME.error.json`` saying what
  failed and what to do.

No record, error file or log line written here names the file: the scan is
its keyed reference (``ref``) everywhere; on the box the quarantined file
keeps its name, and its error file sits beside it (``NAME.error.json``), so an
admin finds it by name there and by reference everywhere else.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EdgeRuntimeError
from .files import file_key, safe_file_name, unique_target
from .health import Health
from .journal import Delivery, InputRecord, Journal
from .logs import event
from .privacy import log_name, loggable_uid, scan_ref, scrub_name
from .results import ScanResult, utc_now
from .sources.base import ScanItem

__all__ = ["QUARANTINE_LOCK", "OutcomeRecorder"]

log = logging.getLogger(__name__)

#: Held while a file and its error file enter the quarantine folder, and by the admin page's retry and
#: discard (edge_runtime/admin/actions.py): an admin never acts on a file half moved in.
QUARANTINE_LOCK = threading.Lock()


class OutcomeRecorder:
    """Records each scan's outcome (journal first, then the file) and counts it."""

    def __init__(
        self,
        journal: Journal,
        health: Health,
        *,
        quarantine_dir: Path,
        dispose: Callable[[ScanItem], None],
        notify_sinks: Callable[[], None],
        reference_key: bytes | None = None,
        log_reasons: bool = False,
    ) -> None:
        self.journal = journal
        self.health = health
        self.quarantine_dir = quarantine_dir
        self._dispose = dispose
        self._notify_sinks = notify_sinks
        self.reference_key = reference_key
        # The journal names scans as this recorder does (and rewrites rows of earlier versions).
        journal.use_reference_key(reference_key)
        #: Log the error's text (it may quote header values); otherwise its code, and the file says more.
        self.log_reasons = log_reasons

    def result(
        self,
        item: ScanItem,
        sha256: str,
        input_id: int,
        result: ScanResult,
        deliveries: Sequence[Delivery],
    ) -> None:
        """Commit a result and its outbox rows, then let the source dispose of the file."""
        path = item.path
        created = self.journal.record_result(input_id, result.message_id, result.payload, deliveries)
        if not created and deliveries:
            # Same message id as the result subscribers hold: the same image under its SOP
            # Instance UID sent again with different bytes (e.g. another transfer syntax).
            self.health.count("duplicates")
            named = log_name(path.name, self.ref(sha256, path.name))
            event(
                log,
                "duplicate",
                "%s repeats the latest image of its instance (%s); result not published again",
                named,
                loggable_uid(result.input.sop_instance_uid),
                file=named,
                sha256=sha256[:16],
                message_id=result.message_id,
            )
        self.health.count("processed")
        self.health.metrics.observe(
            result.timings_ms.model_dump(), within_intended_use=result.intended_use.within
        )
        # The file goes first: once a subscriber has the result, its inbox file is gone.
        self._dispose(item)
        self._notify_sinks()

    def already_done(self, item: ScanItem, sha256: str, record: InputRecord, *, duplicate: bool) -> None:
        """The content already has a committed result: only the file is left to clean up."""
        self.health.count("duplicates")
        what = "duplicate of" if duplicate else "already processed as"
        named = log_name(item.path.name, self.ref(sha256, item.path.name))
        event(
            log,
            "duplicate",
            "%s is a %s %s; not processed again",
            named,
            what,
            record.file_name,
            file=named,
            sha256=sha256[:16],
            original=record.file_name,
            message_id=record.message_id,
        )
        self._dispose(item)

    def failure(
        self, item: ScanItem, sha256: str, record: InputRecord, exc: EdgeRuntimeError, max_attempts: int
    ) -> None:
        """An operational fault (not the file's): count it; quarantine after ``max_attempts``."""
        path = item.path
        failures = self.journal.record_failure(record.id)
        ref = self.ref(sha256, path.name)
        # No file name or free text on the status topic: the reference and the error's code.
        log.error(
            "attempt %d/%d on %s failed: %s (%s)",
            failures,
            max_attempts,
            log_name(path.name, ref),
            scrub_name(exc.message, path.name, ref),
            exc.action,
        )
        self.health.report_code(ref, exc.code)
        if failures >= max_attempts:
            self.quarantine(
                item,
                sha256,
                record.id,
                record.attempts,
                {
                    "code": "processing_failed_repeatedly",
                    "error": f"{ref} failed {failures} times without a usable result; "
                    f"last error: {exc.message}",
                    "action": exc.action,
                },
            )

    def refuse_unread(self, item: ScanItem, error: dict[str, str], attempts: int = 1) -> None:
        """Quarantine a file that was not (or could not be) read: a FIFO, a link, an unreadable file.

        It has no content hash, so the journal records it under :func:`file_key` (name, inode,
        mtime): still exactly one quarantine record, whatever happens next.
        """
        key = file_key(item.path)
        admission = self.journal.admit(key, item.path, 0)
        if admission.action == "finish_quarantine":
            self.move_to_quarantine(item, admission.record.error or {})
            return
        self.quarantine(item, key, admission.record.id, attempts, error, content_hash=False)

    def quarantine(
        self,
        item: ScanItem,
        sha256: str,
        input_id: int,
        attempts: int,
        error: dict[str, str],
        *,
        content_hash: bool = True,
    ) -> None:
        """Record the verdict in the journal, then move the file and write its error file.

        The record names the scan by its reference only: a text that quoted the
        file's name (a message written before the scan was hashed) is rewritten.
        """
        ref = self.ref(sha256, item.path.name)
        document = {
            "ref": ref,
            "sha256" if content_hash else "file_key": sha256,
            **{k: scrub_name(v, item.path.name, ref) if isinstance(v, str) else v for k, v in error.items()},
            "attempts": attempts,
            "quarantined_utc": utc_now(),
            "runtime_version": __version__,
        }
        self.journal.record_quarantine(input_id, document)
        self.move_to_quarantine(item, document)

    def move_to_quarantine(self, item: ScanItem, error: dict[str, Any]) -> None:
        """The file side of a quarantine (also finishes one that a crash interrupted)."""
        path = item.path
        sha256 = error.get("sha256")
        key = sha256 or error.get("file_key")
        # A short printable name: the original may be too long for ".error.json" or not UTF-8.
        with QUARANTINE_LOCK:
            target = unique_target(
                self.quarantine_dir, safe_file_name(path.name), lambda f: _same_input(f, key)
            )
            error_file = target.with_name(target.name + ".error.json")
            tmp = error_file.with_name(error_file.name + ".tmp")
            tmp.write_text(json.dumps(error, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, error_file)
            with contextlib.suppress(FileNotFoundError):
                _move(path, target)
        self.health.count("quarantined")
        ref = str(error.get("ref") or self.ref(str(key or ""), path.name))
        named = log_name(path.name, ref)
        event(
            log,
            "quarantined",
            "quarantined %s: %s",
            named,
            error.get("error") if self.log_reasons else f"{error.get('code')} (see its error file)",
            level=logging.WARNING,
            file=named,
            sha256=str(sha256 or "")[:16],
            code=error.get("code"),
            reason=error.get("error") if self.log_reasons else None,
            action=error.get("action"),
            # The folder only where names stay out of the log: the file there keeps its name.
            moved_to=str(target) if named != ref else str(self.quarantine_dir),
        )
        self.health.report_code(ref, str(error.get("code") or "input_invalid"), "the quarantine error file")

    def ref(self, sha256: str, file_name: str) -> str:
        """The scan's keyed reference (what status, results and logs call it)."""
        return scan_ref(sha256, file_name, key=self.reference_key)


def _move(path: Path, target: Path) -> None:
    """Move without opening: a rename never follows a link or blocks on a FIFO.

    Across disks (EXDEV) a regular file or a link is moved by ``shutil.move`` (which
    re-creates a link, never copying what it points to); a FIFO or device cannot be
    copied, so it is removed from the inbox (its error file says what it was).
    """
    try:
        os.rename(path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        mode = os.lstat(path).st_mode
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            shutil.move(str(path), target)
        else:
            path.unlink()


def _same_input(error_file: Path, key: str | None) -> bool:
    """An earlier, interrupted quarantine of this very input left this error file."""
    try:
        document = json.loads(error_file.read_text())
        return key is not None and key in (document.get("sha256"), document.get("file_key"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
