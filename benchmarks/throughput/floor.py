"""The floor: the runtime's own stage functions on one file, no service around them.

The service is measured against this: ``decode_file -> preprocess -> infer_outputs`` (and, with
reports, the service's own analysis and report build) in a pool of spawned processes, each with
its own model session, or in this process for the single-scan floor. Apart because the pool's
workers import this module, not the whole benchmark, and keep its state (``_FLOOR``).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.util as mp_util
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.throughput.common import BenchError

_FLOOR: dict[str, Any] = {}


def floor_init(
    bundle_path: str,
    backend_name: str,
    threads: int,
    max_pixels: int,
    warm: list[str],
    ready: Any = None,
) -> None:
    from edge_runtime.backends import create_backend
    from edge_runtime.bundle import load_bundle
    from edge_runtime.config import ReportsConfig
    from edge_runtime.decode import DecodeLimits
    from edge_runtime.pipeline import ScanAnalyzer
    from edge_runtime.reports.writer import ReportWriter

    bundle = load_bundle(bundle_path)
    backend = create_backend(backend_name, threads=threads)
    backend.load(bundle)
    limits = DecodeLimits(max_pixels=max_pixels)
    reports = Path(tempfile.mkdtemp(prefix="floor-reports-"))
    # Pool workers leave through os._exit (no atexit): multiprocessing's own finalizers do run.
    mp_util.Finalize(None, shutil.rmtree, args=(reports,), kwargs={"ignore_errors": True}, exitpriority=10)
    _FLOOR.update(
        spec=bundle.preprocessing,
        backend=backend,
        buf=np.empty((1, *bundle.preprocessing.sample_shape), dtype=np.float32),
        limits=limits,
        # The floor with reports: the service's own analysis (in this process, no decoder child)
        # and report build, with the default Reports settings, but no journal, sandbox or MQTT.
        analyzer=ScanAnalyzer(bundle, backend, limits=limits),
        writer=ReportWriter(ReportsConfig(), reports),
        reports=reports,
    )
    for path in warm:
        floor_one(path)
        floor_with_reports_one(path)
    if ready is not None:
        with ready.get_lock():
            ready.value += 1


def floor_one(path: str) -> tuple[float, float, float]:
    """decode_file -> preprocess -> infer_outputs on one file: the seconds of each."""
    from edge_runtime.decode import decode_file
    from edge_runtime.preprocess import preprocess

    t0 = time.perf_counter()
    image = decode_file(Path(path), _FLOOR["limits"])
    t1 = time.perf_counter()
    preprocess(image.pixels, _FLOOR["spec"], out=_FLOOR["buf"][0])
    t2 = time.perf_counter()
    _FLOOR["backend"].infer_outputs(_FLOOR["buf"])
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def floor_with_reports_one(path: str) -> tuple[float, float, float]:
    """The service's analysis and its reports on one file, in-process: (analyze, reports, 0) seconds."""
    t0 = time.perf_counter()
    outcome = _FLOOR["analyzer"].analyze(Path(path))
    t1 = time.perf_counter()
    result = outcome.result()  # priority decided with the result, as the service does
    _FLOOR["writer"].build(result, outcome.header, image=outcome.image, heatmap=outcome.heatmap)
    t2 = time.perf_counter()
    shutil.rmtree(_FLOOR["reports"] / result.message_id, ignore_errors=True)
    return t1 - t0, t2 - t1, 0.0


class FloorPool:
    """``workers`` processes (spawned: no inherited ONNX Runtime threads), each with its own session."""

    def __init__(self, workers: int, init_args: tuple[Any, ...]) -> None:
        ctx = mp.get_context("spawn")
        ready = ctx.Value("i", 0)
        self.pool = ctx.Pool(workers, initializer=floor_init, initargs=(*init_args, ready))
        deadline = time.monotonic() + 300
        while ready.value < workers:  # every worker loaded its model and decoded every kind once
            if time.monotonic() > deadline:
                raise BenchError("the floor pool did not start within 300 s")
            time.sleep(0.05)

    def run(
        self, paths: list[Path], *, reports: bool = False
    ) -> tuple[float, list[tuple[float, float, float]]]:
        one = floor_with_reports_one if reports else floor_one
        t0 = time.perf_counter()
        stages = list(self.pool.imap_unordered(one, [str(p) for p in paths], chunksize=1))
        return time.perf_counter() - t0, stages

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
