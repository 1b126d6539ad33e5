"""``/metrics``: the box in Prometheus text format, for an existing monitoring stack.

Read at scrape time from :class:`~edge_runtime.admin.facts.BoxFacts` (the same
facts as ``/api/status``), plus the latency histograms the flow observes
(:class:`~edge_runtime.metrics.ScanMetrics`). Labels carry sink names, the
model's name and version, never a scan.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import get_args

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..drift import State
from .facts import BoxFacts

__all__ = ["BoxCollector", "render_metrics"]

_STATES = ("online", "degraded")
#: Every drift state, each exported as 0 or 1, so a state left has its series go to 0 (not stale).
DRIFT_STATES: tuple[str, ...] = get_args(State)


class BoxCollector(Collector):
    """Every gauge and counter of the box, collected from one status read."""

    def __init__(self, facts: BoxFacts) -> None:
        self.facts = facts

    def collect(self) -> Iterator[Metric]:
        status = self.facts.status()
        counters = status["counters"]
        scans = CounterMetricFamily(
            "edge_runtime_scans", "Scans since the service started, by outcome.", labels=["outcome"]
        )
        for outcome in ("received", "processed", "quarantined", "duplicates"):
            scans.add_metric([outcome], counters.get(outcome, 0))
        yield scans
        yield _one_of(
            "edge_runtime_state",
            "1 for the service's current state (online, degraded).",
            _STATES,
            status["state"],
        )
        yield GaugeMetricFamily(
            "edge_runtime_ready",
            "1 when a conformant model is loaded and the journal is open (/health/ready).",
            value=1.0 if status["ready"] else 0.0,
        )
        if status["uptime_seconds"] is not None:
            yield GaugeMetricFamily(
                "edge_runtime_uptime_seconds",
                "Seconds since the service started.",
                value=status["uptime_seconds"],
            )
        yield GaugeMetricFamily(
            "edge_runtime_queued_scans",
            "Scans taken and waiting for a worker.",
            value=counters.get("queued", 0),
        )
        pending = GaugeMetricFamily(
            "edge_runtime_outbox_pending", "Results not yet confirmed by each sink.", labels=["sink"]
        )
        delivered = CounterMetricFamily(
            "edge_runtime_delivered",
            "Results each sink confirmed since the service started.",
            labels=["sink"],
        )
        failing = GaugeMetricFamily(
            "edge_runtime_sink_failing", "1 while a sink's deliveries fail (retrying).", labels=["sink"]
        )
        dropped = CounterMetricFamily(
            "edge_runtime_outbox_dropped",
            "Results a sink fell too far behind on and will never get (all time; kept in the journal).",
            labels=["sink"],
        )
        for sink in status["sinks"]:
            pending.add_metric([sink["name"]], sink["outbox_pending"])
            delivered.add_metric([sink["name"]], sink["delivered_since_start"])
            failing.add_metric([sink["name"]], 1.0 if sink["last_error"] else 0.0)
            dropped.add_metric([sink["name"]], sink["dropped_all_time"])
        yield pending
        yield delivered
        yield failing
        yield dropped
        yield GaugeMetricFamily(
            "edge_runtime_quarantine_files",
            "Files in the quarantine folder waiting for an admin.",
            value=status["quarantine"]["files"],
        )
        use = status["intended_use"]
        yield CounterMetricFamily(
            "edge_runtime_results", "Results since the service started.", value=use["results_since_start"]
        )
        yield CounterMetricFamily(
            "edge_runtime_outside_intended_use",
            "Results since start outside the model's intended use (said so in the result).",
            value=use["outside_since_start"],
        )
        if use["outside_share"] is not None:
            yield GaugeMetricFamily(
                "edge_runtime_outside_intended_use_share",
                "Share of results since start outside the model's intended use.",
                value=use["outside_share"],
            )
        model = status["model"] or {}
        if model:
            info = GaugeMetricFamily(
                "edge_runtime_model_info",
                "The running model (value 1).",
                labels=["name", "version", "backend", "sha256"],
            )
            info.add_metric([model["name"], model["version"], model["backend"], model["sha256"]], 1.0)
            yield info
        conformance = (model.get("conformance") or {}).get("verdict")
        yield GaugeMetricFamily(
            "edge_runtime_conformance_passed",
            "1 when the model's conformance check passed on this CPU (0 failed or not checked).",
            value=1.0 if conformance == "passed" else 0.0,
        )
        free = GaugeMetricFamily(
            "edge_runtime_disk_free_bytes", "Free space where the journal and the inbox are.", labels=["for"]
        )
        for disk in status["disk"]:
            free.add_metric([disk["for"]], disk["free_mb"] * 1024 * 1024)
        yield free
        receiver = status["dicom_receiver"]
        if receiver is not None:
            yield GaugeMetricFamily(
                "edge_runtime_dicom_associations_open",
                "DICOM associations open now.",
                value=receiver["associations_open"],
            )
        drift = status.get("drift")
        if drift is not None:
            yield _one_of(
                "edge_runtime_drift_state",
                "1 for the drift monitor's current state.",
                DRIFT_STATES,
                drift["state"],
            )
        yield GaugeMetricFamily(
            "edge_runtime_status_errors",
            "Parts of the status that could not be read on this scrape (see /api/status 'errors').",
            value=len(status["errors"]),
        )
        yield from self.facts.health.metrics.registry.collect()


def _one_of(name: str, documentation: str, states: tuple[str, ...], current: object) -> GaugeMetricFamily:
    """A gauge per state, 1 for ``current`` and 0 for the others (a state left reads 0, not stale)."""
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for state in states:
        family.add_metric([state], 1.0 if current == state else 0.0)
    return family


def render_metrics(facts: BoxFacts) -> bytes:
    """The exposition text (version 0.0.4) of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoxCollector(facts))
    return generate_latest(registry)
