"""Latency histograms and intended-use counts, for ``/metrics`` (Prometheus text format).

The counters an admin already reads (scans received, processed, quarantined)
live in :class:`~edge_runtime.health.Health` and are exported from there at
scrape time; what needs observing as it happens is kept here: how long each
scan's decode and inference took, and whether its result was within the
model's intended use. Each service has its own registry, so two services in
one process (the tests) never mix their numbers.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Histogram

__all__ = ["LATENCY_BUCKETS_S", "ScanMetrics"]

#: Seconds: a decode or an inference on an edge CPU takes milliseconds to a few seconds.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ScanMetrics:
    """What the flow observes per committed result; read by the admin app's ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decode_seconds = Histogram(
            "edge_runtime_decode_seconds",
            "Time to read and decode one scan (in the decoder child), per result.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.preprocess_seconds = Histogram(
            "edge_runtime_preprocess_seconds",
            "Time to preprocess one decoded scan into the model input, per result.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "edge_runtime_inference_seconds",
            "Time the model took on one scan, per result.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._lock = threading.Lock()
        #: Results since start, and those outside the model's intended use (said in the result).
        self.results = 0
        self.outside_intended_use = 0

    def observe(self, timings_ms: Mapping[str, float | None], *, within_intended_use: bool) -> None:
        """One committed result: its stage timings (milliseconds, as in the result) and its verdict."""
        for stage, histogram in (
            ("decode", self.decode_seconds),
            ("preprocess", self.preprocess_seconds),
            ("infer", self.inference_seconds),
        ):
            value = timings_ms.get(stage)
            if value is not None:
                histogram.observe(value / 1000.0)
        with self._lock:
            self.results += 1
            if not within_intended_use:
                self.outside_intended_use += 1

    def outside_share(self) -> float | None:
        """Share of results since start outside the intended use; None before the first result."""
        with self._lock:
            return None if self.results == 0 else self.outside_intended_use / self.results
