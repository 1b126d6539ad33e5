"""Start-up checks against this machine, shared by ``edge-runtime run`` and ``config check``.

The configuration model (:mod:`.config`) checks what the settings say: types,
ranges, CIDR networks, a DICOM spool inside the inbox. This module checks what
the box says about them, the things that otherwise surface only as a scan going
wrong later:

* the folders the service writes (``Inbox.Path``: every scan is deleted or moved
  from it; ``Inbox.QuarantinePath``, ``Inbox.ProcessedPath``; ``Dicom.SpoolPath``
  when the receiver is on) exist or can be created, and a file can be created in
  each: a real write, so a read-only mount is caught even for root, whom
  permission bits do not stop;
* the DICOM port can be bound (``Dicom.Port`` on ``Dicom.BindAddress``) when the
  receiver is on.

``run`` creates missing folders (as the sources always did) and refuses to start
on any problem; ``config check`` creates nothing, checks that a missing folder's
nearest existing parent is writable, and lists every problem with the setting to
fix. Both raise one :class:`~edge_runtime.errors.ConfigError` listing them all
(exit status 2).
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import RuntimeConfig
from .errors import ConfigError

__all__ = ["Problem", "check_machine", "require_machine"]

#: Write probes are named so that the inbox watcher ignores them (IgnoreSuffixes has .tmp).
_PROBE_PREFIX = ".edge-runtime-write-check-"


@dataclass(frozen=True)
class Problem:
    """One start-up problem: the setting, what is wrong, and what to do."""

    setting: str
    message: str
    action: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.message} {self.action}"


def _user() -> str:
    return f"uid {os.geteuid()}"


def _write_problem(setting: str, path: Path, where: Path, exc: OSError) -> Problem:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EROFS:
        action = (
            f"Mount the file system holding {where} read-write (the service deletes or moves files "
            f"there), or point {setting} at a writable folder."
        )
    elif exc.errno in (errno.EACCES, errno.EPERM):
        action = (
            f"Give the service's user ({_user()}) write access to {where} (chown or chmod), or point "
            f"{setting} at a folder it may write."
        )
    elif exc.errno == errno.ENOSPC:
        action = f"Free space on the disk holding {where}."
    else:
        action = f"Check {where} and the disk it is on (system log), or point {setting} elsewhere."
    shown = f"{path}" if where == path else f"{path} (its nearest existing folder {where})"
    return Problem(setting, f"{shown} is not writable: creating a file there failed ({reason}).", action)


def _folder(setting: str, path: Path, *, create: bool) -> Problem | None:
    """Can the service create files in ``path``? ``create``: make it first (``run``)."""
    path = path.absolute()
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            return Problem(setting, f"{path} exists but is not a folder.", f"Point {setting} at a folder.")
        except OSError as exc:
            return _write_problem(setting, path, path, exc)
    where = path
    while not where.exists() and where.parent != where:
        where = where.parent
    if not where.is_dir():
        return Problem(
            setting,
            f"{where} is not a folder" + ("." if where == path else f", so {path} cannot be created."),
            f"Point {setting} at a folder.",
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, suffix=".tmp", dir=where)
    except OSError as exc:
        return _write_problem(setting, path, where, exc)
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError as exc:
        return Problem(
            setting,
            f"a file could be created in {where} but not deleted ({exc.strerror}).",
            f"Give the service's user ({_user()}) the right to delete files in {where}.",
        )
    return None


def _port(config: RuntimeConfig) -> Problem | None:
    """Can the DICOM receiver listen on ``Dicom.BindAddress``:``Dicom.Port``?"""
    address, port = config.dicom.bind_address, config.dicom.port
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return Problem(
            "Dicom.BindAddress",
            f"{address!r} is not an address of this machine ({exc}).",
            "Use one of its IP addresses, or 0.0.0.0 for all.",
        )
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As the receiver binds (address reuse on), so a port in TIME_WAIT is not a false alarm.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return Problem(
                    "Dicom.Port",
                    f"port {port} on {address} is already in use (by another program, or by an "
                    "edge-runtime service already running).",
                    f"Stop the program using it (ss -ltnp 'sport = :{port}' names it) or choose a "
                    "free Dicom.Port.",
                )
            if exc.errno in (errno.EACCES, errno.EPERM):
                return Problem(
                    "Dicom.Port",
                    f"port {port} needs privileges this user ({_user()}) lacks (ports below 1024).",
                    "Choose Dicom.Port 1024 or above (11112 is the registered DICOM port), or grant "
                    "CAP_NET_BIND_SERVICE.",
                )
            if exc.errno == errno.EADDRNOTAVAIL:
                return Problem(
                    "Dicom.BindAddress",
                    f"{address} is not an address of this machine.",
                    "Use one of its IP addresses, or 0.0.0.0 for all.",
                )
            return Problem(
                "Dicom.Port",
                f"cannot listen on {address}:{port} ({exc.strerror or exc}).",
                "Choose another Dicom.Port or Dicom.BindAddress.",
            )
    return None


def check_machine(config: RuntimeConfig, *, create: bool) -> list[Problem]:
    """Every start-up problem of ``config`` on this machine (empty: none).

    Args:
        config: a configuration already valid as such (:func:`~edge_runtime.config.load_config`).
        create: make missing folders, as ``run`` does; ``config check`` passes False and
            nothing is created (a missing folder's nearest existing parent is checked).
    """
    folders = [
        ("Inbox.Path", config.inbox.path),
        ("Inbox.QuarantinePath", config.inbox.quarantine_path),
    ]
    if config.inbox.processed_path is not None:
        folders.append(("Inbox.ProcessedPath", config.inbox.processed_path))
    if config.dicom.enabled:
        folders.append(("Dicom.SpoolPath", config.dicom.spool_path))
    problems = [p for setting, path in folders if (p := _folder(setting, path, create=create))]
    if config.dicom.enabled:
        problem = _port(config)
        if problem is not None:
            problems.append(problem)
    return problems


def require_machine(config: RuntimeConfig, *, create: bool = True) -> None:
    """:func:`check_machine`, raising one ConfigError that lists every problem.

    Raises:
        ConfigError: one line per problem, each naming its setting and what to do.
    """
    problems = check_machine(config, create=create)
    if not problems:
        return
    if len(problems) == 1:
        only = problems[0]
        raise ConfigError(f"{only.setting}: {only.message}", action=only.action or None)
    raise ConfigError(
        f"{len(problems)} start-up problems:\n" + "\n".join(f"  - {p}" for p in problems),
        action="Fix each setting or folder listed, then start again ('edge-runtime config check' "
        "lists them all without starting).",
    )
