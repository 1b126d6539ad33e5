"""No patient identifier leaves the process: keyed scan references, and names kept out of logs.

Senders name files after patients (``DOE_JOHN_MRN123.dcm``), so a file name
never goes on the wire. A scan is named outside the box by a **reference**,
``scan-<16 hex>.<ext>``: an HMAC-SHA256 of its content hash under a key that
is created on the box and never leaves it (``reference.key`` beside the
journal; back it up with the journal so references stay stable). Nobody
without the key can compute or invert it, yet it is stable across restarts
and re-sends, so the admin can match a status line or a subscriber's
complaint to a file with ``grep`` in the service log and the quarantine
error files, which carry both.

The log is the other way out (Greengrass ships component logs to CloudWatch
when configured): :class:`NameRedactor` replaces the names of the scans in
flight with their references in every log record, unless
``Privacy.LogFileNames`` allows names (a site whose logs stay on the box).

Every log line the runtime writes about a scan names it by :func:`log_name`
(its reference, unless ``Privacy.LogFileNames`` allows names), so no line
depends on the redactor having heard of the name first: the inbox watcher
meets files before any worker registers them, and the decoder child is
another process with a redactor of its own that knows no names (it is only
ever told the reference). A SOP Instance UID is logged only when it is one
(:func:`loggable_uid`): a hostile sender can put a name into that field too.
The journal and the quarantine error files keep the reference and a keyed
token of the inbox path (:func:`path_token`), never the name
(:func:`scrub_name` for texts that quoted it).

Exception texts are the third way: a library's message quotes the value it
choked on, and a header value can be a patient's name typed into the wrong
field. Such a text never goes on a wire (messages carry an error code and
its fixed text, :func:`edge_runtime.errors.public_text`); before it is
logged, :func:`scrub_header_values` replaces every value of the scan's
header in it with the attribute's keyword, as the redactor replaces names.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "REDACTOR",
    "NameRedactor",
    "is_dicom_uid",
    "load_or_create_key",
    "log_name",
    "loggable_uid",
    "path_token",
    "scan_ref",
    "scrub_header_values",
    "scrub_name",
]

#: Extensions kept in a published scan name; anything else a sender typed is dropped.
_SAFE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")


def load_or_create_key(path: Path) -> bytes:
    """The box's reference key (32 random bytes, hex in a 0600 file), created on first use."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile
            return load_or_create_key(path)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return bytes.fromhex(key)
    except OSError as exc:
        raise ConfigError(
            f"Cannot read the scan-reference key {path}: {exc.strerror}.",
            action="Give the service user read access to it (it is created 0600 by the service).",
        ) from exc
    try:
        key_bytes = bytes.fromhex(text)
    except ValueError:
        key_bytes = b""
    if len(key_bytes) < 16:
        raise ConfigError(
            f"The scan-reference key {path} is not a key (expected 64 hex digits).",
            action="Restore it from the journal's backup, or delete it to start new references "
            "(earlier references can then no longer be matched to files).",
        )
    return key_bytes


def scan_ref(sha256: str, file_name: str = "", *, key: bytes | None) -> str:
    """The name a scan goes by outside the box: ``scan-<16 hex><.ext>``.

    With the box's key (always, in the service) the hex is a keyed hash of the
    content hash; without one (``edge-runtime process`` on a workstation, tests
    of single stages) it is the content hash's first 16 digits.
    """
    suffix = Path(file_name).suffix.lower() if file_name else ""
    digest = hmac.new(key, sha256.encode(), hashlib.sha256).hexdigest() if key else sha256
    return f"scan-{digest[:16] or 'unhashed'}{suffix if suffix in _SAFE_SUFFIXES else ''}"


def path_token(path: str, *, key: bytes | None) -> str:
    """A keyed digest of a file's path: tells two paths apart without naming either.

    What the journal keeps to recognise an inbox file again while it exists
    (``hmac:`` with the box's key, ``sha256:`` without one).
    """
    # The escaped text form (as earlier journals stored paths), so both give one token.
    raw = os.fsencode(path).decode("utf-8", "backslashreplace").encode()
    if key:
        return "hmac:" + hmac.new(key, b"path|" + raw, hashlib.sha256).hexdigest()[:32]
    return "sha256:" + hashlib.sha256(b"path|" + raw).hexdigest()[:32]


def scrub_name(text: str, name: str, ref: str) -> str:
    """``text`` with the file name ``name`` (and its escaped form) written as ``ref``."""
    if not name or not text:
        return text
    escaped = os.fsencode(name).decode("utf-8", "backslashreplace")
    for form in sorted({name, escaped}, key=len, reverse=True):
        text = text.replace(form, ref)
    return text


#: A DICOM UID as PS3.5 §9.1 allows it: components of digits without leading zeros, joined by dots.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_dicom_uid(value: object) -> bool:
    """A DICOM UID (PS3.5 §9.1): digits and dots, no leading zeros, at most 64 characters.

    The same rule as pydicom's ``UID.is_valid``, without pydicom: results, logs and the
    training environments (which have no pydicom) check UIDs through this one function.
    """
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def loggable_uid(uid: object) -> str | None:
    """``uid`` for a log line if it is a DICOM UID (it cannot then hold a name), else a placeholder."""
    if uid is None or uid == "":
        return None
    text = str(uid)
    return text if is_dicom_uid(text) else "<not a DICOM UID: withheld>"


class NameRedactor:
    """Replaces the file names of scans in flight with their references in log text."""

    def __init__(self) -> None:
        self.enabled = False
        self._names: dict[str, str] = {}
        #: One pattern for every name, longest first (a name may contain another); rebuilt on
        #: change, not per log record. ``None``: no names.
        self._pattern: re.Pattern[str] | None = None
        self._refs: dict[str, str] = {}
        self._lock = threading.Lock()

    def register(self, name: str, ref: str) -> None:
        """From now on ``name`` (and its escaped form) is written as ``ref``."""
        if not name:
            return
        escaped = os.fsencode(name).decode("utf-8", "backslashreplace")
        with self._lock:
            self._names[name] = ref
            self._names[escaped] = ref
            self._reorder()

    def forget(self, name: str) -> None:
        escaped = os.fsencode(name).decode("utf-8", "backslashreplace")
        with self._lock:
            self._names.pop(name, None)
            self._names.pop(escaped, None)
            self._reorder()

    def _reorder(self) -> None:
        names = sorted(self._names, key=len, reverse=True)
        refs = dict(self._names)
        # A name counts only as a whole name: not inside a longer one. Another scan's reference
        # ("scan-3f9a0c1d2e4b5a6a.dcm") ends in "a.dcm", and a file named "a.dcm" in flight must
        # not turn that reference into its own.
        pattern = (
            re.compile(r"(?<![A-Za-z0-9_.\-])(?:" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9_\-])")
            if names
            else None
        )
        self._pattern, self._refs = pattern, refs  # read without the lock: swapped, never changed

    def scrub(self, text: str) -> str:
        if not self.enabled:
            return text
        return self.scrub_always(text)

    def scrub_always(self, text: str) -> str:
        """``text`` with names in flight replaced, even where logs may name files (the admin page)."""
        pattern, refs = self._pattern, self._refs
        if pattern is None:
            return text
        return pattern.sub(lambda match: refs[match.group(0)], text)


#: The process's redactor: the workers register names, the log formatters scrub with it.
REDACTOR = NameRedactor()


def log_name(name: str, ref: str) -> str:
    """What a log line calls a scan: ``ref``, or its name where ``Privacy.LogFileNames`` allows names.

    Names are allowed exactly when the redactor is off (the entry point switches it
    on unless ``Privacy.LogFileNames`` is true).
    """
    return ref if REDACTOR.enabled else os.fsencode(name).decode("utf-8", "backslashreplace")


#: Header values shorter than this are left in a scrubbed text: "M" or "1" would garble it.
_MIN_SCRUBBED = 3


def _header_values(dataset: Any) -> dict[str, str]:
    """Every text value in ``dataset`` (nested too), with the keyword it belongs to."""
    values: dict[str, str] = {}
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or []:
                for value, keyword in _header_values(item).items():
                    values.setdefault(value, keyword)
            continue
        if element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") or element.tag >> 16 == 0x7FE0:
            continue
        try:
            raw = element.value
        except Exception:  # noqa: S112  a value pydicom cannot even convert is not quoted either
            continue
        items = raw if isinstance(raw, Sequence) and not isinstance(raw, str | bytes) else [raw]
        for item in items:
            text = str(item).strip(" \x00")
            keyword = element.keyword or str(element.tag)
            for part in {text, *text.replace("=", "^").split("^")}:
                if len(part.strip()) >= _MIN_SCRUBBED:
                    values.setdefault(part.strip(), keyword)
    return values


def scrub_header_values(text: str, dataset: Any) -> str:
    """``text`` with each value of ``dataset`` (a DICOM header) replaced by ``<Keyword>``.

    For an exception's text before it is logged: a library's message quotes
    the value it refused (``Unable to convert 'JOHANNA51' to 'DA'``), and the
    value may be a name. Person names are also replaced by component, longest
    value first, so a message quoting part of a name loses that part too.
    """
    if dataset is None or not text:
        return text
    try:
        with warnings.catch_warnings():  # pydicom's warnings about a value quote it
            warnings.simplefilter("ignore")
            values = _header_values(dataset)
    except Exception:  # scrubbing must never raise: a scrubbed text is logged on a failure path
        return "<text withheld: the header could not be read to scrub it>"
    for value in sorted(values, key=len, reverse=True):
        if value in text:
            text = text.replace(value, f"<{values[value]}>")
    return text
