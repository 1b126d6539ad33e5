"""``Model.Backend: auto``: the fastest engine of the bundle that computes what the build machine did.

A bundle can carry the same model for several engines (ONNX Runtime and
LiteRT for the bundled one), and which is faster depends on the CPU and the
thread count: on a 2-core AMD EPYC with VNNI, ONNX Runtime INT8 is 0.84 ms and
LiteRT INT8 0.92 ms with one thread, but LiteRT is 0.55 ms with two
(``bench_throughput``, part c). ``auto`` measures instead of guessing:

1. every engine the bundle has a file for, that is installed here and whose
   file this CPU may run (:func:`~edge_runtime.conformance.require_cpu_support`),
   is loaded and timed on :data:`TIMED_RUNS` inferences of one sample;
2. fastest first (the bundle's first engine keeps first place unless another is
   more than :data:`MARGIN` faster, so a box does not switch engines between
   restarts over timing noise), each runs the bundle's conformance set on this CPU, and the
   first that passes is kept. Speed never buys a different answer: an engine
   chosen by ``auto`` meets the same check as one named in the configuration;
3. the choice is logged with every timing and every skipped engine's reason;
   results and status name the engine (``model.backend``) and its file's sha256,
   as for a named one.

A fleet whose boxes differ in CPU may so run different engines. Their answers
agree within the conformance tolerance, which is what every box is held to;
name the engine instead of ``auto`` where the fleet must run one file.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np

from .backends import Backend
from .bundle import ModelBundle
from .conformance import ConformanceReport, check_conformance, open_engine
from .errors import BackendError, ConformanceError, ModelBundleError
from .logs import event

__all__ = ["MARGIN", "TIMED_RUNS", "BackendTiming", "choose_backend"]

log = logging.getLogger(__name__)

#: Timed inferences per engine (after 5 untimed): ~30 ms for the bundled 96 px model.
TIMED_RUNS = 30
#: Another engine replaces the bundle's first one only when it is this much faster.
MARGIN = 0.10


@dataclass(frozen=True)
class BackendTiming:
    """One candidate engine: its median inference time, or why it was not a candidate."""

    name: str
    p50_ms: float | None = None
    skipped: str | None = None


def _time_inference(backend: Backend, bundle: ModelBundle, runs: int) -> float:
    sample = np.zeros((1, *bundle.preprocessing.sample_shape), dtype=np.float32)
    for _ in range(5):
        backend.infer_outputs(sample)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.infer_outputs(sample)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def choose_backend(
    bundle: ModelBundle, *, threads: int, threshold: float | None = None, runs: int = TIMED_RUNS
) -> tuple[Backend, ConformanceReport | None, list[BackendTiming]]:
    """Load the fastest engine of ``bundle`` that passes its conformance check on this CPU.

    Returns the loaded engine, its conformance report (None for a bundle without a
    reference set) and every candidate's timing. When no engine passes, the fastest
    one is returned with its failed report, for the caller to refuse as for a named
    engine.

    Raises:
        BackendError: no engine of the bundle can be loaded here.
    """
    timings: list[BackendTiming] = []
    loaded: list[tuple[float, str, Backend]] = []
    for name in dict.fromkeys(bundle.backends):  # manifest order, each engine once
        try:
            backend = open_engine(bundle, name, threads=threads)
        except (BackendError, ConformanceError, ModelBundleError) as exc:
            timings.append(BackendTiming(name, skipped=exc.message))
            continue
        p50 = _time_inference(backend, bundle, runs)
        timings.append(BackendTiming(name, p50_ms=p50))
        loaded.append((p50, name, backend))
    if not loaded:
        reasons = "; ".join(f"{t.name}: {t.skipped}" for t in timings) or "the bundle lists no model file"
        raise BackendError(
            f"Model.Backend is auto, but no engine of model {bundle.name} {bundle.version} "
            f"can run here ({reasons}).",
            action="Install an engine the bundle has a model file for (see the reasons), or name "
            "one in Model.Backend.",
        )
    preferred = loaded[0]  # the bundle's first engine that loaded (manifest order)
    loaded.sort(key=lambda item: item[0])
    if preferred[0] <= loaded[0][0] * (1 + MARGIN):
        loaded.remove(preferred)
        loaded.insert(0, preferred)
    chosen: tuple[Backend, ConformanceReport | None] | None = None
    first_failure: tuple[Backend, ConformanceReport] | None = None
    for _, name, backend in loaded:
        if chosen is not None:
            backend.close()
            continue
        try:
            report = check_conformance(bundle, backend, threshold)
        except Exception:
            backend.close()
            raise
        if report is None or report.passed:
            chosen = (backend, report)
            continue
        log.warning("Model.Backend auto: %s is not used: %s", name, report.explain())
        if first_failure is None:
            first_failure = (backend, report)  # kept: refused by the caller if none passes
        else:
            backend.close()
    if chosen is None:
        assert first_failure is not None
        return first_failure[0], first_failure[1], timings
    if first_failure is not None:
        first_failure[0].close()
    backend, report = chosen
    event(
        log,
        "backend_chosen",
        "Model.Backend auto: %s (%s)",
        backend.name,
        ", ".join(
            f"{t.name} {t.p50_ms:.2f} ms" if t.p50_ms is not None else f"{t.name} skipped: {t.skipped}"
            for t in timings
        ),
        backend=backend.name,
        timings_ms={t.name: round(t.p50_ms, 3) for t in timings if t.p50_ms is not None},
        skipped={t.name: t.skipped for t in timings if t.skipped},
        threads=threads,
    )
    return backend, report, timings
