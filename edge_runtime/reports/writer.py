"""Writes one result's reports (heat-map, Secondary Capture, SR, FHIR) before the result is committed.

Order matters for the delivery contract: the files are written (each to a
temporary name, fsynced, renamed, then the folder fsynced) *before* the
result and its outbox rows are committed, so every file a result links to
exists, and the sinks that send them (PACS, FHIR server) read them from
here, however long an outage lasts. The folder is named by the result's
``message_id``: analysing the same scan again (after a crash before the
commit) rewrites the same files with the same UIDs, so nothing is doubled.

Header values that are invalid for their VR (a birth date ``19510000``, a
sex ``U``, a time ``10:30:00``) are normalised or left out before highdicom
sees them (:mod:`.header`); the log names each such attribute and why, never
its value. A report that still cannot be built does not cost the scan its
result: the result carries ``reports.error_code`` and that code's fixed text
in ``reports.error`` (:func:`edge_runtime.errors.public_text`), and the
status' ``last_error`` names the code. The exception's own text goes only to
the service log, with the header's values scrubbed out of it
(:func:`edge_runtime.privacy.scrub_header_values`): a library's message
quotes the value it refused, and that value may be a patient's name.

A full disk is one such failure, named as such: writing the files fails with
``ENOSPC`` (or ``EDQUOT``), the partial files are removed and the result
carries ``reports.error_code`` ``disk_full``
(:class:`~edge_runtime.errors.ReportDiskFull`); the scan is never retried or
quarantined for it. :mod:`.processes` then stops building reports until space
is back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ReportsConfig
from ..durable import fsync_dir
from ..errors import EdgeRuntimeError, ReportDiskFull, ReportError, public_text
from ..logs import event
from ..privacy import scrub_header_values
from ..results import Reports, ScanResult

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "ReportOutcome",
    "ReportWriter",
    "failed_outcome",
    "is_disk_full",
    "log_outcome",
    "read_source_header",
]

log = logging.getLogger(__name__)


def is_disk_full(exc: BaseException) -> bool:
    """An ``OSError`` that says the file system has no space left (``ENOSPC``) or the quota is used up."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def read_source_header(header: bytes) -> Dataset:
    """The scan's DICOM header (no pixels) from the bytes the decoder read.

    ``header`` is :attr:`~edge_runtime.pipeline.ScanOutcome.header` (the file up to
    its pixel data, or all of it): the reports describe exactly what was decoded and
    hashed, and the file, which may have changed since, is never opened again.
    """
    import pydicom  # imported when used: a service without DICOM input starts faster

    return pydicom.dcmread(BytesIO(header), stop_before_pixels=True, force=True)


@dataclass(frozen=True)
class ReportOutcome:
    """What building one result's reports came to (plain values: it crosses a process boundary)."""

    #: The result's ``reports`` links; with an ``error`` key when they could not be built.
    links: dict[str, Any] | None
    #: The files written.
    files: list[str]
    #: What the admin should do, when ``links`` says ``error``.
    action: str | None
    #: The exception's text with the header's values scrubbed out: for the service log only.
    detail: str | None = None
    #: Header attributes normalised or left out, with why (:class:`.header.HeaderFix`, no values).
    header_fixes: tuple[str, ...] = ()


def failed_outcome(
    message_id: str,
    exc: BaseException,
    *,
    header: Dataset | None = None,
    header_fixes: tuple[str, ...] = (),
) -> ReportOutcome:
    """The outcome of reports that could not be built: a code and its fixed text, never ``exc``'s text.

    ``reports.error`` is :func:`~edge_runtime.errors.public_text` of the code
    (a :class:`~edge_runtime.errors.ReportError`'s own, else ``report_failed``); the
    exception's text, with ``header``'s values scrubbed out, is the
    ``detail`` the parent logs.
    """
    # Ours say which report failed and why; anything else (highdicom, pydicom, an I/O error) is
    # "report_failed", with the details in the log.
    code = exc.code if isinstance(exc, ReportError) else ReportError.code
    action = exc.action if isinstance(exc, EdgeRuntimeError) else ReportError.action
    detail = scrub_header_values(f"{type(exc).__name__}: {exc}", header)[:2000]
    return ReportOutcome(
        {"folder": message_id, "error": public_text(code), "error_code": code},
        [],
        action,
        detail=detail,
        header_fixes=header_fixes,
    )


def log_outcome(result: ScanResult, outcome: ReportOutcome) -> Reports | None:
    """Say what happened to a result's reports (in the service's log); returns its links."""
    links = outcome.links
    message_id = result.message_id
    if outcome.header_fixes:
        event(
            log,
            "header_fixed",
            "header of %s: %s; the reports leave these out or normalise them",
            message_id[:16],
            "; ".join(outcome.header_fixes),
            level=logging.WARNING,
            message_id=message_id,
            fixes=list(outcome.header_fixes),
        )
    if links is not None and "error" in links:
        log.error(
            "reports for %s not written (%s): %s; the result is published without them. %s",
            message_id[:16],
            links.get("error_code", ReportError.code),
            outcome.detail or links["error"],
            outcome.action or ReportError.action,
        )
    elif outcome.files:
        event(
            log,
            "reports",
            "reports for %s written: %s",
            message_id[:16],
            ", ".join(outcome.files),
            message_id=message_id,
            files=outcome.files,
            priority=result.priority,
        )
    return None if links is None else Reports(**links)


@dataclass(frozen=True)
class _File:
    name: str
    data: bytes


def _dicom_bytes(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dicom_ref(name: str, dataset: Dataset) -> dict[str, str]:
    return {
        "file": name,
        "sop_instance_uid": str(dataset.SOPInstanceUID),
        "series_instance_uid": str(dataset.SeriesInstanceUID),
    }


class ReportWriter:
    """Builds and writes the reports of one result into ``Reports.Path/<message_id>/``."""

    def __init__(self, config: ReportsConfig, path: Path) -> None:
        self.config = config
        #: ``RuntimeConfig.reports_path``: one folder per result below it.
        self.path = path

    @property
    def enabled(self) -> bool:
        return self.config.dicom_sr or self.config.fhir or self.config.heatmap

    def folder(self, message_id: str) -> Path:
        return self.path / message_id

    def write(
        self,
        result: ScanResult,
        header: bytes | None,
        *,
        image: np.ndarray | None,
        heatmap: np.ndarray | None,
    ) -> Reports | None:
        """Write what applies to this result, in this process; returns its ``reports`` links (or None).

        The service builds reports in child processes instead (:mod:`.processes`),
        which run this same :meth:`build`.
        """
        if not self.enabled:
            return None
        return log_outcome(result, self.build(result, header, image=image, heatmap=heatmap))

    def build(
        self,
        result: ScanResult,
        source_header: bytes | None,
        *,
        image: np.ndarray | None,
        heatmap: np.ndarray | None,
    ) -> ReportOutcome:
        """Build and write the files of a result (its reports not yet attached); logs nothing.

        ``source_header``: the scan's DICOM header bytes as the decoder read them
        (:attr:`~edge_runtime.pipeline.ScanOutcome.header`); None for other images.
        """
        message_id = result.message_id
        links: dict[str, Any] = {"folder": message_id}
        files: list[_File] = []
        raw: Dataset | None = None
        fixes: tuple[str, ...] = ()
        try:
            header: Dataset | None = None
            if result.input.kind == "dicom":
                from .header import clean_header

                if source_header is None:
                    raise ValueError("the DICOM header the decoder read was not handed over")
                raw = read_source_header(source_header)
                header, header_fixes = clean_header(raw)
                fixes = tuple(str(fix) for fix in header_fixes)
            secondary: Dataset | None = None
            # A scan outside the intended use gets no heat-map: a map of where the model "looked"
            # would read as evidence for a call it did not make.
            assessed = result.finding.assessed
            if self.config.heatmap and heatmap is not None and image is not None and assessed:
                from .heatmap import overlay, png_bytes, secondary_capture

                rgb = overlay(
                    image, heatmap, max_side=self.config.heatmap_max_side, finding=result.finding.model_dump()
                )
                files.append(_File("heatmap.png", png_bytes(rgb)))
                links["heatmap_png"] = "heatmap.png"
                if header is not None:
                    secondary = secondary_capture(
                        header,
                        rgb,
                        uid_root=self.config.uid_root,
                        message_id=message_id,
                        model=result.model.model_dump(),
                    )
                    files.append(_File("heatmap.dcm", _dicom_bytes(secondary)))
                    links["heatmap_dicom"] = _dicom_ref("heatmap.dcm", secondary)
            if header is not None and (self.config.dicom_sr or self.config.fhir):
                from .fhir import fhir_from_sr
                from .sr import build_sr

                sr = build_sr(result, header, uid_root=self.config.uid_root, heatmap=secondary)
                if self.config.dicom_sr:
                    files.append(_File("sr.dcm", _dicom_bytes(sr)))
                    links["sr"] = _dicom_ref("sr.dcm", sr)
                if self.config.fhir:
                    bundle = fhir_from_sr(sr, result)
                    files.append(_File("fhir.json", json.dumps(bundle, sort_keys=True).encode()))
                    links["fhir"] = "fhir.json"
        except Exception as exc:  # a report must never cost the scan its result
            return failed_outcome(message_id, exc, header=raw, header_fixes=fixes)
        if not files:
            return ReportOutcome(None, [], None, header_fixes=fixes)
        folder = self.folder(message_id)
        try:
            self._write_files(folder, files)
        except OSError as exc:  # nothing half-written is left behind (see _write_files)
            if is_disk_full(exc):
                full = ReportDiskFull(f"no space left to write the reports into {folder}: {exc.strerror}")
                full.__cause__ = exc
                return failed_outcome(message_id, full, header=raw, header_fixes=fixes)
            return failed_outcome(message_id, exc, header=raw, header_fixes=fixes)
        return ReportOutcome(links, [f.name for f in files], None, header_fixes=fixes)

    @staticmethod
    def _write_files(folder: Path, files: list[_File]) -> None:
        """Write ``files`` into ``folder`` durably: each under a temporary name, fsynced, renamed.

        The fsyncs (each file's, and the parent's for a new folder) are issued together on
        :data:`_FSYNC_POOL`: a disk flushes concurrent ones in one journal commit, so four
        files cost about one flush instead of four. Only when every one has returned are
        the files renamed into place and the folder fsynced. If anything fails (a full
        disk), the temporary files go, and the folder too when this call created it.
        """
        created = not folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        temps: list[tuple[str, _File]] = []
        fds: list[int] = []
        try:
            for item in files:
                fd, temp = tempfile.mkstemp(prefix=f".{item.name}.", suffix=".part", dir=folder)
                fds.append(fd)
                temps.append((temp, item))
                view = memoryview(item.data)
                while view:
                    view = view[os.write(fd, view) :]
            if created:
                fds.append(os.open(folder.parent, os.O_RDONLY))
            for done in [_FSYNC_POOL.submit(os.fsync, fd) for fd in fds]:
                done.result()
            for temp, item in temps:
                os.replace(temp, folder / item.name)
        except BaseException:
            for temp, _ in temps:
                Path(temp).unlink(missing_ok=True)
            if created:
                # Not empty (another write of the same result) or already gone: left as it is.
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        fsync_dir(folder)


#: Runs the report files' fsyncs side by side (see ReportWriter._write_files).
_FSYNC_POOL = ThreadPoolExecutor(max_workers=6, thread_name_prefix="reports-fsync")
