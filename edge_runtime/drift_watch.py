"""The box's drift monitor: one :class:`~edge_runtime.drift.DriftMonitor`, fed by the flow, kept on restart.

:mod:`edge_runtime.drift` is pure; this is where it meets the running service: worker threads
feed it (one lock), the heartbeat reads its report for the status and the health file and
saves its windows durably beside the journal, and a live model change gives it the new
bundle's reference (the windows restart, the site's header baseline stays). What it is fed is
what the result already publishes (the verdict, the probability, the call, header codes), plus
the coarse manufacturer string, so nothing in it traces back to a patient.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .config import DriftConfig
from .drift import DriftMonitor, DriftReport, DriftSettings, Observation
from .durable import write_durably
from .manifest import DriftReference
from .results import ScanResult

__all__ = ["SiteDrift", "observation_of", "spacing_band"]

log = logging.getLogger(__name__)


def spacing_band(spacing_mm: tuple[float, float] | None) -> str | None:
    """A pixel spacing as a 0.05 mm band ("0.10-0.15 mm"): a detector change shows, a rounding does not."""
    if not spacing_mm:
        return None
    low = math.floor(float(spacing_mm[0]) * 20) / 20
    return f"{low:.2f}-{low + 0.05:.2f} mm"


def observation_of(
    result: ScanResult, manufacturer: str | None = None, at: float | None = None
) -> Observation:
    """What the monitor learns from one committed result."""
    data = result.input
    facts = {
        "modality": data.modality,
        "view": data.view_position,
        "photometric": data.photometric_interpretation,
        "pixel_spacing": spacing_band(data.pixel_spacing_mm),
        "manufacturer": manufacturer,
        "kind": data.kind,
    }
    finding = result.finding
    return Observation(
        at=time.time() if at is None else at,
        within=result.intended_use.within,
        ood_score=result.intended_use.ood_score,
        probability=finding.probability if finding.assessed else None,
        positive=finding.positive,
        metadata={key: value for key, value in facts.items() if value},
    )


class SiteDrift:
    """Thread-safe drift monitoring for this box, its state saved in ``path``."""

    def __init__(
        self, config: DriftConfig, path: Path, reference: Callable[[], DriftReference | None]
    ) -> None:
        self.path = path
        self._reference = reference
        self._settings = DriftSettings(
            window_scans=config.window_scans,
            window_hours=config.window_hours,
            min_scans=min(config.min_scans, config.window_scans),
            psi_alarm=config.psi_alarm,
            psi_watch=min(0.1, config.psi_alarm),
            outside_share_alarm=config.outside_share_alarm,
            outside_share_watch=min(0.1, config.outside_share_alarm),
        )
        self._lock = threading.Lock()
        self._dirty = False
        self._last_state: str | None = None
        self._monitor = self._restore(reference())

    def _restore(self, reference: DriftReference | None) -> DriftMonitor:
        if not self.path.is_file():
            return DriftMonitor(reference, self._settings)
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            return DriftMonitor.from_state(reference, self._settings, state)
        except (OSError, ValueError) as exc:
            log.warning("drift monitoring starts afresh: %s (%s)", exc, self.path)
            return DriftMonitor(reference, self._settings)

    def _current(self) -> DriftMonitor:
        """The monitor, moved onto the running model's reference if the model changed."""
        reference = self._reference()
        if reference is not self._monitor.reference:
            self._monitor = DriftMonitor.from_state(reference, self._settings, self._monitor.to_state())
        return self._monitor

    def observe(self, observation: Observation) -> DriftReport:
        with self._lock:
            report = self._current().observe(observation)
            self._dirty = True
        if report.state != self._last_state:
            if report.state in ("watch", "alarm"):
                log.warning("drift monitoring: %s", report.summary())
            else:
                log.info("drift monitoring: %s", report.state)
            self._last_state = report.state
        return report

    def observe_result(self, result: ScanResult, manufacturer: str | None = None) -> DriftReport:
        return self.observe(observation_of(result, manufacturer))

    def observe_refused(self, metadata: Mapping[str, str] | None = None) -> DriftReport:
        """A scan refused on its header (outside the intended use before the model ran)."""
        return self.observe(Observation(at=time.time(), within=False, metadata=dict(metadata or {})))

    def report(self) -> DriftReport:
        with self._lock:
            return self._current().report(time.time())

    def save(self) -> None:
        """Write the windows durably if they changed (heartbeat and stop)."""
        with self._lock:
            if not self._dirty:
                return
            data = json.dumps(self._monitor.to_state(), separators=(",", ":")).encode()
            self._dirty = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            part = self.path.with_name(self.path.name + ".part")
            part.unlink(missing_ok=True)
            write_durably(part, self.path, data)
        except OSError as exc:
            self._dirty = True
            log.warning("cannot save the drift monitor's windows to %s: %s", self.path, exc)
