"""Decode in a child process, with a time limit and a memory cap.

Decoders are large C libraries (libjpeg, OpenJPEG, CharLS, GDCM) fed with
files from the network. A malformed file can make one spin forever, allocate
without bound or crash the process. None of that may stop the service, so
the service decodes in a :class:`DecodeSandbox`: a long-lived child process
(one per worker) that runs :func:`~edge_runtime.prepare.prepare_file` (decode,
preprocess, hash the pixels, shrink the heat-map preview: only those small
results come back, never the full-size image), and that

* runs with ``RLIMIT_AS`` set to ``Decode.MemoryLimitMb``, so a runaway
  allocation fails inside the child (``MemoryError``) instead of waking the
  kernel's OOM killer on the box;
* gets ``Decode.TimeoutSeconds`` per file; when it overruns, it is killed
  and replaced, and the file is quarantined;
* is replaced as well if it dies (segfault, abort), and the file is
  quarantined with the exit signal;
* decodes only what was admitted: it is given the scan's hash and size
  (:class:`~edge_runtime.files.ScanFile`), reads the file once through
  a no-follow descriptor, checks the bytes against that hash and decodes those
  bytes (:func:`~edge_runtime.files.read_verified`). A file swapped
  between the service's hash and this read ends the attempt with
  :class:`~edge_runtime.errors.InputChanged` (tried again as new content);
* is told the scan's keyed reference and calls the scan by it in every
  message and log line: the child has no redactor, so it never learns the
  file's name (only its path, to open it).

Children are forked from a ``forkserver`` that has preloaded the decoders,
so a replacement is ready in milliseconds and never inherits the parent's
threads (ONNX Runtime, paho). Decoder plugins registered in the parent are
registered in the child too.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import resource
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import decode as decode_stage
from .errors import CorruptImage, DecodeCrashed, DecoderFault, DecodeTimeout, InputChanged, InputError
from .files import ScanFile
from .prepare import PreparedScan, PrepareOptions, prepare_file
from .procname import DECODER, name_process

__all__ = ["DecodeSandbox"]

log = logging.getLogger(__name__)

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(
    ["edge_runtime.decode", "edge_runtime.decode.dicom", "edge_runtime.decode.raster", "edge_runtime.prepare"]
)


_ERRORS: dict[str, type[InputError]] = {}


def _error_class(name: str) -> type[InputError]:
    """Map an error class name from the child back to the class (InputError subclasses)."""
    if not _ERRORS:
        pending: list[type[InputError]] = [InputError]
        while pending:
            cls = pending.pop()
            _ERRORS[cls.__name__] = cls
            pending.extend(cls.__subclasses__())
    return _ERRORS.get(name, InputError)


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _raised_in_our_code(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is in this package (our bug) or a library (bad data).

    A library that chokes on a damaged file (pydicom, OpenCV, a JPEG codec) says the file
    is corrupt; an error raised by our own code is a fault of the runtime, retried and
    reported as such instead of blaming the file.
    """
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and str(Path(last.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE_DIR)


#: A child idle this long hands its freed heap back to the system (see :func:`_keep_heap`).
IDLE_TRIM_S = 1.0


def _child_main(conn: Connection, registry: dict[str, str], memory_bytes: int) -> None:
    name_process(DECODER)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    _keep_heap()
    decode_stage.use_registry(registry)
    while True:
        try:
            request = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if request is None:
            return
        if request == "ping":
            conn.send(("pong",))
            continue
        path, options, scan, name = request
        reply = _prepare_reply(Path(path), options, scan, name)
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("memory", ""))
        del reply
        # Between the scans of a burst the heap is kept: the next image reuses its pages. Once
        # idle, the decoder's working memory (a full-resolution image and the libraries'
        # buffers) goes back to the system (what that saves: docs/performance.md).
        if not conn.poll(IDLE_TRIM_S):
            _release_memory()


def _prepare_reply(
    path: Path, options: PrepareOptions, scan: ScanFile | None, name: str, *, retry: bool = True
) -> tuple[Any, ...]:
    """The child's answer for one file: the prepared scan, or the error as plain values.

    Out of memory, the kept heap of the burst's earlier images is given back and the
    file tried once more, so whether a file fits ``Decode.MemoryLimitMb`` does not
    depend on the files before it.
    """
    try:
        return ("ok", prepare_file(path, options, scan=scan, name=name))
    except InputError as exc:
        return ("input_error", type(exc).__name__, exc.message, exc.action)
    except InputChanged as exc:
        return ("changed", exc.message)
    except MemoryError:
        if not retry:
            return ("memory", "")
    except Exception as exc:
        return ("error", f"{type(exc).__name__}: {exc}", _raised_in_our_code(exc))
    _release_memory()  # outside the except block: the failed attempt's frames are gone by now
    return _prepare_reply(path, options, scan, name, retry=False)


def _keep_heap() -> None:
    """Keep freed memory in the heap until :func:`_release_memory` (glibc, in the child only).

    By default glibc maps each large block (a 14 MB float image) afresh and gives the
    freed top of the heap back at once, so every decode page-faults its ~30 MB of
    buffers in again: 8 ms of a 27 ms RG1_UNCR decode here. With these thresholds the
    pages stay until the child has been idle for :data:`IDLE_TRIM_S`.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: no automatic trim below 1 GiB free
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: blocks up to 64 MB come from the heap
    except (OSError, AttributeError):
        pass


def _release_memory() -> None:
    """Hand the heap freed by the last decode back to the system (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class DecodeSandbox:
    """One decoder child process; not thread-safe (use one per worker thread)."""

    def __init__(self, timeout_s: float = 30.0, memory_limit_mb: int = 2048) -> None:
        self.timeout_s = timeout_s
        self.memory_bytes = memory_limit_mb * 1024 * 1024 if memory_limit_mb > 0 else 0
        self._proc: Any = None
        self._conn: Connection | None = None
        self.restarts = 0
        self._lock = threading.Lock()

    def _start(self) -> None:
        parent, child = _CTX.Pipe()
        proc = _CTX.Process(
            target=_child_main,
            args=(child, decode_stage.registered_decoders(), self.memory_bytes),
            name="edge-decoder",
            daemon=True,
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def warm_up(self, timeout_s: float = 60.0) -> None:
        """Start the child now and wait until it answers, so the first scan does not pay."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            assert self._conn is not None
            self._conn.send("ping")
            if self._conn.poll(timeout_s):
                self._conn.recv()

    def prepare(
        self, path: Path, options: PrepareOptions, *, scan: ScanFile | None = None, name: str | None = None
    ) -> PreparedScan:
        """:func:`~edge_runtime.prepare.prepare_file` in the child; raises the same errors.

        ``scan``: what was hashed and admitted (the child decodes only those bytes);
        ``name``: what messages call the scan (its reference), default the file's name.
        """
        label = name or path.name
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            assert self._conn is not None
            try:
                self._conn.send((str(path), options, scan, label))
                ready = self._conn.poll(self.timeout_s)
                reply = self._conn.recv() if ready else None
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
                reply = ("died", None)
            if reply is None:
                self._kill()
                self.restarts += 1
                log.warning(
                    "decoder for %s exceeded %.0f s and was stopped; a new one takes over",
                    label,
                    self.timeout_s,
                )
                raise DecodeTimeout(
                    f"Decoding {label} took longer than {self.timeout_s:.0f} s "
                    "(Decode.TimeoutSeconds); the decoder was stopped."
                )
            kind = reply[0]
            if kind == "ok":
                prepared: PreparedScan = reply[1]
                return prepared
            if kind == "input_error":
                raise _error_class(reply[1])(reply[2], action=reply[3])
            if kind == "changed":
                raise InputChanged(reply[1])
            if kind == "memory":
                self._kill()
                self.restarts += 1
                raise DecodeCrashed(
                    f"Decoding {label} needed more than "
                    f"{self.memory_bytes // (1024 * 1024)} MB (Decode.MemoryLimitMb)."
                )
            if kind == "error" and reply[2]:
                raise DecoderFault(
                    f"The runtime's own decoder code failed on {label}: {reply[1]}. This is a "
                    "fault of the runtime, not necessarily of the file."
                )
            if kind == "error":
                raise CorruptImage(f"The decoder failed on {label}: {reply[1]}")
            # The child died mid-file (segfault, abort, killed).
            exitcode = None
            if self._proc is not None:
                self._proc.join(timeout=2)
                exitcode = self._proc.exitcode
            self._kill()
            self.restarts += 1
            how = (
                f"signal {signal.Signals(-exitcode).name}"
                if exitcode and exitcode < 0
                else f"exit code {exitcode}"
            )
            raise DecodeCrashed(f"The decoder process died ({how}) while reading {label}.")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    self._conn.send(None)
            if self._proc is not None:
                self._proc.join(timeout=2)
            self._kill()
