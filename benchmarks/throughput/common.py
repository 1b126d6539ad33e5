"""What every part of the throughput benchmark shares: the checkout, stage names, errors, output.

Apart so that the parts (inputs, floor, services, measurements, report) import these from one
place instead of from each other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: The checkout the benchmark measures (the service subprocess runs from it).
REPO = Path(__file__).resolve().parents[2]
#: The stages of the service's own ``timings_ms``, in order (what is left of the latency is "other").
STAGES = ("queue", "hash", "decode", "preprocess", "infer", "reports")


class BenchError(SystemExit):
    pass


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def say(text: str = "") -> None:
    print(text, flush=True)
