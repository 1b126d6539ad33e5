"""Writing files so that they survive a power cut: the one place the runtime spells it out.

A file is durable once its data are fsynced *and* the folder entry that names
it is: a rename (or a new file) is only in the folder's metadata until the
folder itself is fsynced. The journal's id file, the DICOM receiver's spool
and the report files all go through here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "write_durably"]


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` (a rename, a new file) survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(part: Path, final: Path, *chunks: bytes | memoryview) -> None:
    """Write ``chunks`` to ``part`` (new), fsync it, rename it to ``final``, fsync the folder.

    Readers that ignore ``part``'s name (a ``.part`` suffix) never see a half-written file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(part, flags, 0o640)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.rename(part, final)
    fsync_dir(final.parent)
