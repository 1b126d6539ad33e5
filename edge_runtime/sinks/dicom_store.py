"""The PACS sink: each result's DICOM SR and heat-map Secondary Capture, sent by C-STORE.

The objects were written to ``Reports.Path/<message_id>/`` before the result
was committed; the outbox row names them, and this sink sends them to the
PACS node in ``Dicom.Store`` over one association per result. A C-STORE
success (or warning) status from the PACS is the confirmation; anything else
(the PACS down, the association rejected, a failure status) is a
:class:`~edge_runtime.errors.PublishError` the drainer retries with back-off,
so an outage only delays the reports. Their UIDs are derived from the
result's ``message_id``: a resend after a crash stores the same instances,
which a PACS keeps once.

The SR carries the patient and study modules of the scan it reports on (a
PACS files it into that study); it goes only to the hospital's own PACS.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import RuntimeConfig
from ..errors import PublishError
from ..journal import Delivery, OutboxMessage
from ..results import ScanResult
from .base import Acknowledge, BoxState

if TYPE_CHECKING:
    import pydicom

__all__ = ["DicomStoreSink", "from_config"]

log = logging.getLogger(__name__)

#: Outbox rows name the result's DICOM files in this order (the SR references the heat-map).
_DICOM_REPORTS = ("heatmap_dicom", "sr")


def from_config(
    config: RuntimeConfig, ipc: Any = None, state: BoxState | None = None
) -> DicomStoreSink | None:
    return DicomStoreSink(config) if config.dicom.store.host else None


class DicomStoreSink:
    """C-STORE of the report objects to ``Dicom.Store`` (the PACS)."""

    name = "dicom-store"
    label = "PACS"
    primary = False

    def __init__(self, config: RuntimeConfig) -> None:
        #: The running configuration; each new result brings the live one (Dicom.Store may change).
        self._config = config
        # pynetdicom logs each refused or failed association as ERROR lines of its own; the
        # drainer logs one WARNING saying what failed and what to check, and retries.
        for name in ("pynetdicom.acse", "pynetdicom.transport"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        self._config = config
        reports = result.reports
        if reports is None or not config.dicom.store.host:
            return None
        files = [ref.file for key in _DICOM_REPORTS if (ref := getattr(reports, key)) is not None]
        if not files:
            return None
        node = config.dicom.store
        row = {"folder": reports.folder, "files": files}
        return Delivery(self.name, f"{node.ae_title}@{node.host}:{node.port}", json.dumps(row), 1)

    def start(self, acknowledge: Acknowledge) -> None:
        """Nothing to connect: one association per result, opened in :meth:`send`."""

    def ready(self) -> bool:
        return True

    def send(self, message: OutboxMessage) -> None:
        from pynetdicom import AE  # imported when used: the service starts without it otherwise

        config = self._config
        node = config.dicom.store
        row = json.loads(message.payload)
        folder = config.reports_path / row["folder"]
        datasets = [_read(folder / name) for name in row["files"]]
        ae = AE(ae_title=config.dicom.ae_title)
        for dataset in datasets:
            ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = node.timeout_seconds
        where = f"{node.ae_title} at {node.host}:{node.port}"
        with warnings.catch_warnings():
            # When the PACS refuses the connection, pynetdicom drops its socket unclosed and
            # CPython closes it with a ResourceWarning: nothing leaks, and we say why below.
            warnings.simplefilter("ignore", ResourceWarning)
            assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        if not assoc.is_established:
            reason = "rejected the association" if assoc.is_rejected else "could not be reached"
            raise PublishError(
                f"PACS {where} {reason}",
                action="Check Dicom.Store (host, port, AE title) and that the PACS accepts our AE "
                f"title {config.dicom.ae_title!r} and SR / Secondary Capture objects; reports are "
                "kept and sent once it does.",
            )
        try:
            for name, dataset in zip(row["files"], datasets, strict=True):
                status = assoc.send_c_store(dataset)
                code = int(getattr(status, "Status", -1)) if status else -1
                if code != 0 and not (0xB000 <= code <= 0xBFFF):
                    raise PublishError(
                        f"PACS {where} did not store {name} of {row['folder'][:16]} "
                        + (f"(status 0x{code:04X})" if code >= 0 else "(no reply)"),
                        action="Read the PACS's log for this status; reports are kept and sent again.",
                    )
        finally:
            assoc.release()

    def stop(self, timeout_s: float) -> None:
        """Nothing held open between results."""


def _read(path: Path) -> pydicom.Dataset:
    import pydicom

    try:
        return pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise PublishError(
            f"report file {path} cannot be read ({exc})",
            action="Reports.Path must keep each result's files until they are delivered; restore "
            "the folder or resend the scan.",
        ) from exc
