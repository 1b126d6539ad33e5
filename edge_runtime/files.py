"""Reading an untrusted scan file safely: regular files only, no links followed, bounded.

Whatever lands in the inbox is opened here first (to hash it, the journal's
identity for it), with ``O_NOFOLLOW | O_NONBLOCK`` and checked with
``fstat`` on the open descriptor, so:

* a FIFO or device never blocks a worker (it is refused before any read);
* a symbolic link is refused unread (or, with ``Inbox.Symlinks:
  inside-inbox``, followed only to a regular file inside the inbox), so no
  file elsewhere on the box can be analysed and published;
* a file over ``Inbox.MaxFileMb``, or one that cannot be read within
  ``Inbox.ReadTimeoutSeconds``, is refused rather than hashed for ever.

The decoder then reads the scan once more (:func:`read_verified`, in the
decoder child): through the same kind of descriptor, from the very file that
was hashed (a link's target as resolved then), and it decodes only bytes whose
sha256 is the one the journal admitted. A file swapped or rewritten between
the hash and the decode (a time-of-check/time-of-use gap) is never analysed
under the first content's identity: :class:`~edge_runtime.errors.InputChanged`
ends the attempt and the new content is admitted as new work.

Names are also made safe here: :func:`display_name` for logs and the journal
(undecodable bytes escaped), :func:`safe_file_name` for the quarantine folder
(short, printable, unique).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import InboxConfig
from .errors import (
    FileTooLarge,
    IncompleteInput,
    InputChanged,
    NotARegularFile,
    SymlinkRefused,
    UnreadableFile,
)

__all__ = [
    "ScanFile",
    "display_name",
    "file_key",
    "read_scan",
    "read_verified",
    "safe_file_name",
    "unique_target",
]

_CHUNK = 1 << 20
#: Longest quarantine name (bytes); leaves room for ".N" and ".error.json" under NAME_MAX (255).
MAX_NAME_BYTES = 160


@dataclass(frozen=True)
class ScanFile:
    """What was read: the content hash (the journal's identity) and the size."""

    sha256: str
    size_bytes: int
    #: The path that was opened and hashed: the scan's own, or the target of a link that
    #: ``Inbox.Symlinks: inside-inbox`` allowed. :func:`read_verified` reads this one again.
    opened: str = ""


def display_name(name: str) -> str:
    """``name`` as text that any log, JSON or SQLite accepts (undecodable bytes as ``\\xNN``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def safe_file_name(name: str) -> str:
    """A short, printable name for the quarantine folder, keeping the extension when it is sane."""
    text = display_name(name)
    cleaned = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in text).strip() or "unnamed"
    if len(cleaned.encode()) <= MAX_NAME_BYTES:
        return cleaned
    suffix = Path(cleaned).suffix if len(Path(cleaned).suffix) <= 10 else ""
    tag = "~" + hashlib.sha256(text.encode()).hexdigest()[:8]
    stem = cleaned[: len(cleaned) - len(suffix)]
    while len((stem + tag + suffix).encode()) > MAX_NAME_BYTES:
        stem = stem[:-1]
    return stem + tag + suffix


def file_key(path: Path) -> str:
    """An identity for a file that could not be read: its name, inode and mtime (hex sha256).

    Stable across retries of the same file, so a refused FIFO or link is
    recorded (and quarantined) once, like any scan.
    """
    try:
        st = os.lstat(path)
        facts = f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"
    except OSError:
        facts = "gone"
    return hashlib.sha256(f"unread|{os.fsencode(str(path))!r}|{facts}".encode()).hexdigest()


def _open_flags() -> int:
    return os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _resolve_link_inside(path: Path, config: InboxConfig) -> Path:
    """The regular file inside the inbox that ``path`` (a link) points to, or SymlinkRefused."""
    name = display_name(path.name)
    target = Path(os.path.realpath(path))
    root = config.path.resolve()
    excluded = [config.quarantine_path.resolve()]
    if config.processed_path is not None:
        excluded.append(config.processed_path.resolve())
    inside = target.is_relative_to(root) and not any(target.is_relative_to(e) for e in excluded)
    if config.symlinks != "inside-inbox" or not inside:
        where = "inside the inbox" if inside else "outside the inbox"
        raise SymlinkRefused(
            f"{name} is a symbolic link (to a file {where}); it was not followed and nothing was read."
        )
    return target


def read_scan(path: Path, config: InboxConfig) -> ScanFile:
    """Open ``path`` safely and hash it within the configured limits.

    Raises:
        FileNotFoundError: it is gone (the caller forgets it).
        NotARegularFile, SymlinkRefused, UnreadableFile, FileTooLarge: quarantine it.
    """
    name = display_name(path.name)
    if os.path.islink(path):
        path = _resolve_link_inside(path, config)
    try:
        fd = os.open(path, _open_flags())
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link swapped in after the check above
            raise SymlinkRefused(f"{name} is a symbolic link; it was not followed.") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise UnreadableFile(
                f"{name} cannot be read by the service's user (uid {os.geteuid()}): {exc.strerror}."
            ) from exc
        raise
    with os.fdopen(fd, "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a named pipe (FIFO)"
                if stat.S_ISFIFO(st.st_mode)
                else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket"
                if stat.S_ISSOCK(st.st_mode)
                else "not a regular file"
            )
            raise NotARegularFile(f"{name} is {kind}, not a file; it was not read.")
        limit = config.max_file_mb * 1024 * 1024
        if st.st_size > limit:
            raise FileTooLarge(
                f"{name} is {st.st_size / 1e6:.0f} MB, over Inbox.MaxFileMb = {config.max_file_mb}; "
                "it was not read."
            )
        os.set_blocking(fh.fileno(), True)
        digest = hashlib.sha256()
        deadline = time.monotonic() + config.read_timeout_seconds
        size = 0
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if size > limit:
                raise FileTooLarge(f"{name} grew past Inbox.MaxFileMb = {config.max_file_mb} while read.")
            if time.monotonic() > deadline:
                raise FileTooLarge(
                    f"{name} could not be read within Inbox.ReadTimeoutSeconds = "
                    f"{config.read_timeout_seconds:g} s ({size / 1e6:.0f} MB read)."
                )
    return ScanFile(digest.hexdigest(), size, str(path))


def read_verified(scan: ScanFile, name: str) -> bytes:
    """The content of an admitted scan, read once and checked against its admitted hash.

    Opened like :func:`read_scan` opened it (``O_NOFOLLOW``: a link swapped in since is
    refused, whatever ``Inbox.Symlinks`` says), one ``readall`` into one buffer, hashed;
    the caller decodes exactly these bytes. ``name`` is what messages call the scan
    (its reference in the service).

    Raises:
        IncompleteInput: the file is gone (as when a decoder finds it gone).
        InputChanged: it is no longer the regular file of ``scan.size_bytes`` bytes and
            ``scan.sha256`` that was admitted.
    """
    changed = f"{name} changed after it was hashed"
    try:
        fd = os.open(scan.opened, _open_flags())
    except FileNotFoundError as exc:
        raise IncompleteInput(f"{name} disappeared before it could be decoded.") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputChanged(
                f"{changed}: it was replaced by a symbolic link; nothing was decoded."
            ) from exc
        raise InputChanged(f"{changed}: it cannot be opened again ({exc.strerror}).") from exc
    with os.fdopen(fd, "rb", buffering=0) as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != scan.size_bytes:
            raise InputChanged(
                f"{changed} ({scan.size_bytes} bytes then, {st.st_size} now); nothing was decoded."
            )
        os.set_blocking(fd, True)
        data = fh.readall()  # sized from fstat: one allocation, no second copy
    if len(data) != scan.size_bytes or hashlib.sha256(data).hexdigest() != scan.sha256:
        raise InputChanged(f"{changed} (its content is no longer the admitted sha256); nothing was decoded.")
    return data


def unique_target(folder: Path, name: str, same: Callable[[Path], bool] | None = None) -> Path:
    """A free name for ``name`` in ``folder`` (``stem.N.suffix``), never overwriting a file.

    ``same(error_file)`` says an earlier, interrupted move of this very input
    left that error file: then its name is reused, so a crash does not
    duplicate the file.
    """
    target = folder / name
    n = 1
    while target.exists() or (folder / f"{target.name}.error.json").exists():
        if same is not None and same(folder / f"{target.name}.error.json"):
            return target
        target = folder / f"{Path(name).stem}.{n}{Path(name).suffix}"
        n += 1
    return target
