"""Each sink stands alone: only the results channel holds new scans; any other sink is capped.

The results channel (the sinks marked ``primary``: MQTT results and urgent
topics, or Greengrass local pub/sub when MQTT is off) carries the journal's
promise that every scan is published once in effect, so only its backlog
holds new scans at their source (``Journal.MaxOutboxMessages``,
:func:`edge_runtime.workers.intake_blocked`). Every other sink (the PACS, the
FHIR server, the MQTT FHIR topic, AWS IoT Core) is on its own: while it is
down its rows wait in the outbox and results keep flowing everywhere else,
within two limits per sink:

* ``Journal.MaxOutboxMessagesPerSink`` undelivered rows;
* ``Reports.RetainMbPerSink`` MB of report folders of the results it has not
  confirmed (0: no budget).

**The rule.** Beyond either limit, that sink's *oldest* undelivered rows are
dropped (moved to the journal's ``outbox_dropped`` table, fsynced) until it is
within both again, and a dropped result's report folder is removed at once
unless another sink still has to send it. Each drop batch is one WARNING
naming the sink, the count and the limit, and adds to the status counter
``outbox_dropped``. Checked after every result and at start-up, so a sink
holds at most its limits. The status names a sink that is behind (rows
waiting while its deliveries fail, or for longer than :data:`BEHIND_AFTER_S`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from ..config import RuntimeConfig
from ..journal import Journal
from ..logs import event
from ..reports.retention import ReportSizes, remove_report_folders
from .drainer import OutboxDrainer

__all__ = ["BEHIND_AFTER_S", "SinkBacklogs"]

log = logging.getLogger(__name__)

#: A sink whose oldest undelivered row is this old is reported behind even without a failure.
BEHIND_AFTER_S = 60.0


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class SinkBacklogs:
    """Applies the per-sink limits and says which sinks are behind (for the status)."""

    def __init__(
        self,
        config: Callable[[], RuntimeConfig],
        journal: Journal,
        drainers: Sequence[OutboxDrainer],
        *,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self._config = config
        self._journal = journal
        #: The results channel's outbox names: their backlog holds new scans; never dropped.
        self.primary = frozenset(d.name for d in drainers if getattr(d.sink, "primary", False) is True)
        #: Every other sink, each capped on its own.
        self.secondary = [d for d in drainers if d.name not in self.primary]
        #: Told how many rows each drop batch dropped (the status counter).
        self.on_dropped = on_dropped
        self._sizes = ReportSizes()
        # Workers finish results concurrently; one check at a time keeps each batch whole.
        self._lock = threading.Lock()

    # -- limits ------------------------------------------------------------------------
    def enforce(self) -> int:
        """Drop each secondary sink's oldest rows beyond its limits; returns how many were dropped.

        Never raises: a failure here must not touch the scan that triggered it (its
        result is committed); it is logged and the next result checks again.
        """
        dropped = 0
        with self._lock:
            config = self._config()
            for drainer in self.secondary:
                try:
                    dropped += self._enforce_one(config, drainer)
                except Exception as exc:
                    log.warning(
                        "could not check the backlog of %s: %s: %s", drainer.label, type(exc).__name__, exc
                    )
        return dropped

    def _enforce_one(self, config: RuntimeConfig, drainer: OutboxDrainer) -> int:
        waiting = self._journal.undelivered_of(drainer.name)  # newest first
        if not waiting:
            return 0
        cap = config.journal.max_outbox_messages_per_sink
        dropped = 0
        if len(waiting) > cap:
            dropped += self._drop(
                config,
                drainer,
                keep=cap,
                limit=f"more than Journal.MaxOutboxMessagesPerSink = {cap} results waiting",
            )
            waiting = waiting[:cap]
        budget_mb = config.reports.retain_mb_per_sink
        if budget_mb > 0:
            root, budget = config.reports_path, budget_mb * 1024 * 1024
            total, keep = 0, len(waiting)
            for i, message_id in enumerate(waiting):
                total += self._sizes.of(root, message_id)
                if total > budget:
                    keep = i
                    break
            if keep < len(waiting):
                dropped += self._drop(
                    config,
                    drainer,
                    keep=keep,
                    limit=f"their reports would take more than Reports.RetainMbPerSink = {budget_mb} MB",
                )
            if len(self._sizes) > 2 * len(waiting) + 1000:
                # Measured folders of rows since delivered or dropped, of every secondary sink.
                self._sizes.keep_only(self._journal.undelivered_message_ids())
        return dropped

    def _drop(self, config: RuntimeConfig, drainer: OutboxDrainer, *, keep: int, limit: str) -> int:
        dropped = self._journal.drop_oldest(drainer.name, keep, reason=limit)
        if not dropped:
            return 0
        # Only folders no sink waits for any more; a result's MQTT row may also still wait.
        needed = self._journal.still_undelivered(dropped)
        removed = remove_report_folders(config.reports_path, [m for m in dropped if m not in needed])
        event(
            log,
            "outbox_dropped",
            "%s is behind: dropped its %d oldest undelivered results (%s); it will not get them, "
            "every other sink did or still will. %d report folders removed (no other sink needed "
            "them). The dropped rows are listed in the journal's outbox_dropped table. Bring %s "
            "back, or raise the limit if outages this long are expected here.",
            drainer.label,
            len(dropped),
            limit,
            removed,
            drainer.label,
            level=logging.WARNING,
            sink=drainer.name,
            count=len(dropped),
            oldest=dropped[0],
            newest=dropped[-1],
            folders_removed=removed,
        )
        if self.on_dropped is not None:
            self.on_dropped(len(dropped))
        return len(dropped)

    # -- status ------------------------------------------------------------------------
    def behind(self) -> list[str]:
        """Each secondary sink that is behind, as the status says it.

        ``PACS (dicom-store) behind: 7 undelivered, oldest 3 min``: rows waiting
        while its deliveries fail, or for longer than :data:`BEHIND_AFTER_S`.
        """
        backlog = self._journal.backlog_by_sink()
        now = datetime.now(UTC)
        found = []
        for drainer in self.secondary:
            waiting = backlog.get(drainer.name)
            if waiting is None:
                continue
            try:
                age = (now - datetime.fromisoformat(waiting.oldest_utc)).total_seconds()
            except ValueError:
                age = 0.0
            if drainer.failing is None and age < BEHIND_AFTER_S:
                continue
            oldest = _age(max(0.0, age))
            found.append(f"{drainer.label} behind: {waiting.pending} undelivered, oldest {oldest}")
        return found
