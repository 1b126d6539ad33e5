"""The measurements, parts (a) to (e) of issue #16, each returning its numbers for the report.

(a) throughput against the floor, (b) single-scan latency, (c) the backends, (d) the service
as a subprocess under a backlog and (e) its cold start. Apart from the harness (services, floor,
memory) they drive and from the report that prints what they return.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.throughput.common import REPO, STAGES, BenchError, pct, say
from benchmarks.throughput.floor import FloorPool, floor_one
from benchmarks.throughput.inputs import CopyMaker, n_for
from benchmarks.throughput.memory import HAS_PSUTIL, MemorySampler
from benchmarks.throughput.profiling import profile_drops
from benchmarks.throughput.services import InProcessService, ServiceProcess


def measure_throughput(
    args: argparse.Namespace,
    kinds: list[str],
    maker: CopyMaker,
    floor: FloorPool,
    services: dict[str, InProcessService],
    work: Path,
) -> dict[str, Any]:
    say(
        f"\n(a) throughput: {args.rounds} rounds, order floor/floor-with-reports/service/"
        "service-no-reports flipped each round"
    )
    out: dict[str, Any] = {}
    sides = ("floor", "floor_reports", "service", "service_no_reports")
    for key in kinds:
        out[key] = {"n": n_for(args, key), **{side: [] for side in sides}}
        out[key]["floor_stages_ms"] = []
        out[key]["floor_reports_stages_ms"] = []
        out[key]["service_stages_ms"] = {"service": [], "service_no_reports": []}
    for r in range(args.rounds):
        for key in kinds:
            n = n_for(args, key)
            order = list(sides)
            if r % 2:
                order.reverse()
            line = []
            for which in order:
                copies = maker.many(key, n)
                if which in ("floor", "floor_reports"):
                    folder = work / "floor" / key
                    folder.mkdir(parents=True, exist_ok=True)
                    paths = []
                    for name, data, _ in copies:
                        (folder / name).write_bytes(data)
                        paths.append(folder / name)
                    elapsed, stages = floor.run(paths, reports=which == "floor_reports")
                    for p in paths:
                        p.unlink()
                    out[key][which].append(n / elapsed)
                    out[key][f"{which}_stages_ms"] += [[s * 1000 for s in st] for st in stages]
                else:
                    drop = services[which].drop(copies, timeout_s=120 + 5 * n)
                    out[key][which].append(n / drop.elapsed)
                    out[key]["service_stages_ms"][which] += [
                        res["timings_ms"] for res in drop.results.values()
                    ]
                line.append(f"{which} {out[key][which][-1]:7.1f}/s")
            say(f"  round {r + 1} {key:13s} " + "  ".join(line))
    for key in kinds:
        row = out[key]
        for which in sides:
            row[f"{which}_median"] = statistics.median(row[which])
        row["ratio"] = row["service_median"] / row["floor_median"]
        row["ratio_no_reports"] = row["service_no_reports_median"] / row["floor_median"]
        # The service with its reports against the same work done without the service around it.
        row["ratio_vs_floor_reports"] = row["service_median"] / row["floor_reports_median"]
    return out


def measure_latency(
    args: argparse.Namespace,
    kinds: list[str],
    maker: CopyMaker,
    services: dict[str, InProcessService],
    work: Path,
) -> dict[str, Any]:
    repeats = args.latency_repeats
    say(
        f"\n(b) single-scan latency: {repeats} scans per input and side, one at a time, floor, service and "
        "service without reports alternating"
    )
    out: dict[str, Any] = {}
    folder = work / "single"
    folder.mkdir(parents=True, exist_ok=True)
    for key in kinds:
        ms: dict[str, list[float]] = {"floor": [], "service": [], "service_no_reports": []}
        stages: dict[str, list[dict[str, float]]] = {"service": [], "service_no_reports": []}
        for i in range(repeats + 1):  # the first of each is a warm-up
            order = ["floor", "service", "service_no_reports"]
            if i % 2:
                order.reverse()
            for which in order:
                if which == "floor":
                    name, data, _ = maker.make(key)
                    path = folder / name
                    path.write_bytes(data)
                    t = sum(floor_one(str(path))) * 1000
                    path.unlink()
                    if i:
                        ms["floor"].append(t)
                    continue
                drop = services[which].drop([maker.make(key)], timeout_s=120)
                time.sleep(0.05)  # the service idle again (heartbeat, drainers) before the next one
                if i:
                    ms[which].extend(drop.latencies_ms())
                    stages[which].extend(r["timings_ms"] for r in drop.results.values())
        row: dict[str, Any] = {f"{k}_ms": v for k, v in ms.items()}
        for which, values in ms.items():
            row[f"{which}_p50"] = pct(values, 50)
            row[f"{which}_p95"] = pct(values, 95)
        for which, rows in stages.items():
            other = [e2e - sum(s.get(k, 0.0) for k in STAGES) for e2e, s in zip(ms[which], rows, strict=True)]
            row[f"{which}_stage_p50_ms"] = {k: pct([s.get(k, 0.0) for s in rows], 50) for k in STAGES} | {
                "other": pct(other, 50)
            }
        row["ratio_p95"] = row["service_p95"] / row["floor_p95"]
        row["ratio_p95_no_reports"] = row["service_no_reports_p95"] / row["floor_p95"]
        out[key] = row
        say(
            f"  {key:13s} p50 floor {row['floor_p50']:7.1f} ms, service {row['service_p50']:7.1f} ms, "
            f"without reports {row['service_no_reports_p50']:7.1f} ms"
        )
    return out


def measure_backends(args: argparse.Namespace, sample: Path) -> dict[str, Any]:
    from edge_runtime.backends.onnx import OnnxRuntimeBackend
    from edge_runtime.bundle import default_bundle_path, load_bundle
    from edge_runtime.decode import decode_file
    from edge_runtime.preprocess import preprocess

    say("\n(c) backends: batch 1, interleaved blocks")
    bundle = load_bundle(args.bundle or default_bundle_path())
    x = preprocess(decode_file(sample).pixels, bundle.preprocessing)[None].astype(np.float32)
    makers: dict[str, Callable[[int], Any]] = {}
    skipped: dict[str, str] = {}

    def fp32(threads: int) -> Any:
        backend = OnnxRuntimeBackend(threads)
        heat = bundle.manifest.heatmap_output("onnxruntime")
        try:
            backend.load_model(
                args.fp32,
                input_name=bundle.input_name,
                sample_shape=bundle.preprocessing.sample_shape,
                heatmap_name=heat,
                classes=len(bundle.labels),
            )
        except Exception:  # an FP32 file exported before the heat-map: scores only
            backend.load_model(args.fp32, input_name=bundle.input_name)
        return backend

    if args.fp32 is not None and Path(args.fp32).is_file():
        makers["ORT FP32"] = fp32
    else:
        skipped["ORT FP32"] = f"no FP32 model at {args.fp32} (pass --fp32 runs/<run>/model.fp32.onnx)"

    def int8(name: str) -> Callable[[int], Any]:
        def make(threads: int) -> Any:
            from edge_runtime.backends import create_backend

            backend = create_backend(name, threads=threads)
            backend.load(bundle)
            return backend

        return make

    makers["ORT INT8"] = int8("onnxruntime")
    if "litert" in bundle.backends:
        try:
            from edge_runtime.backends.litert import load_interpreter_class

            load_interpreter_class()
            makers["LiteRT INT8"] = int8("litert")
        except Exception as exc:
            skipped["LiteRT INT8"] = f"LiteRT not importable ({exc})"
    else:
        skipped["LiteRT INT8"] = "the bundle has no LiteRT model"
    engines: dict[tuple[str, int], Any] = {}
    for label, make in makers.items():
        for threads in (1, 2):
            try:
                engines[(label, threads)] = make(threads)
            except Exception as exc:
                skipped[label] = f"cannot load: {type(exc).__name__}: {exc}"
                break
    times: dict[tuple[str, int], list[float]] = {k: [] for k in engines}
    for engine in engines.values():
        for _ in range(10):
            engine.infer_outputs(x)
    block = 25
    for _ in range(max(1, args.backend_runs // block)):
        for k, engine in engines.items():
            for _ in range(block):
                t0 = time.perf_counter()
                engine.infer_outputs(x)
                times[k].append((time.perf_counter() - t0) * 1000)
    for label, why in skipped.items():
        say(f"  skipped {label}: {why}")
    rows = {
        f"{label} {threads}t": {
            "backend": label,
            "threads": threads,
            "batch": 1,
            "runs": len(t),
            "p50_ms": pct(t, 50),
            "p95_ms": pct(t, 95),
        }
        for (label, threads), t in times.items()
    }
    for engine in engines.values():
        engine.close()
    return {"rows": rows, "skipped": skipped}


def measure_scale(
    args: argparse.Namespace, kinds: list[str], maker: CopyMaker, port: int, work: Path, out_dir: Path
) -> dict[str, Any]:
    n = args.scale or (200 if args.quick else 1000)
    say(f"\n(d, e) edge-runtime run as a subprocess: cold start, then {n} JPEGs at once, then large kinds")
    root = work / "cli"
    (root / "inbox").mkdir(parents=True)
    service = ServiceProcess(root, port, args.workers, out_dir)
    imports_s = import_time()
    first = maker.make("jpeg")
    (root / "inbox" / first[0]).write_bytes(first[1])  # pre-dropped: found by the start-up scan
    subscriber = service.start()
    assert service.proc is not None
    sampler = MemorySampler(service.proc.pid, interval_s=0.1).start()
    result: dict[str, Any] = {"n": n}
    try:
        with subscriber.cond:
            ok = subscriber.cond.wait_for(
                lambda: subscriber.first_online() is not None and first[2] in subscriber.arrived, 120
            )
        if not ok:
            raise BenchError(f"edge-runtime run did not come online with a result (log: {service.log_path})")
        t_exec = service.t_exec
        cold = {
            "imports_only_s": imports_s,
            "first_log_s": _rel(service.first_log(), t_exec),
            "starting_log_s": _rel(service.first_log("starting: model"), t_exec),
            "online_s": _rel(subscriber.first_online(), t_exec),
            "first_result_s": _rel(subscriber.arrived[first[2]], t_exec),
            "settle_s": 1.0,  # Inbox.SettleSeconds default: a file found at start-up waits this long
        }
        result["cold_start"] = cold
        time.sleep(2.0)  # the decoders are up, the first scan's reports are written
        copies = maker.many("jpeg", n)
        drop = service.drop(subscriber, copies, timeout_s=120 + 2 * n)
        order = list(drop.renamed)
        lat = np.asarray([(drop.acked[s] - drop.renamed[s]) * 1000 for s in order])
        arrivals = np.sort(np.asarray(list(drop.acked.values())))
        rename_times = np.sort(np.asarray(list(drop.renamed.values())))
        deciles = []
        for i, chunk in enumerate(np.array_split(np.arange(n), 10)):
            part = lat[chunk]
            deciles.append(
                {
                    "decile": i + 1,
                    "p50_ms": pct(part, 50),
                    "p95_ms": pct(part, 95),
                    "max_ms": float(part.max()),
                }
            )
        t_end = float(arrivals[-1])
        mem_during = sampler.peak(drop.t0, t_end + 0.2)
        timeline = [
            {
                "t_s": s[0] - drop.t0,
                "processes": s[1],
                "rss_mb": s[2],
                "pss_mb": s[3],
                "backlog": int(
                    np.searchsorted(rename_times, s[0], "right") - np.searchsorted(arrivals, s[0], "right")
                ),
            }
            for s in sampler.samples
            if drop.t0 - 1.0 <= s[0] <= t_end + 1.0
        ]
        result["scale"] = {
            "drain_s": drop.elapsed,
            "scans_per_s": n / drop.elapsed,
            "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "max": float(lat.max())},
            "latency_by_position_ms": [float(v) for v in lat],
            "deciles": deciles,
            "memory_peak": mem_during,
            "timeline": timeline,
        }
        # The large kinds, a few each: the peak RSS with 1955x1841 images in flight.
        big = [k for k in kinds if k != "jpeg"]
        t_big = time.perf_counter()
        if big:
            mixed = [c for k in big for c in maker.many(k, args.workers)]
            service.drop(subscriber, mixed, timeout_s=300)
            result["large_kinds_memory_peak"] = sampler.peak(t_big)
            result["large_kinds"] = big
        if args.profile:
            result["profiles"] = profile_drops(args, service, subscriber, maker, kinds, n, out_dir)
    finally:
        sampler.sample()
        sampler.stop()
        result["exit_code"] = service.stop()
        subscriber.close()
    result["memory_peak_overall"] = sampler.peak()
    result["peak_rss_by_process_mb"] = {str(k): v for k, v in sampler.peak_rss_by_pid.items()}
    result["memory_method"] = "psutil + /proc" if HAS_PSUTIL else "/proc (psutil not installed)"
    return result


def import_time(runs: int = 3) -> float:
    """Median seconds of a Python process that only imports the CLI and the service, then exits."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import edge_runtime.cli, edge_runtime.service"],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            check=True,
        )
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rel(t: float | None, t0: float) -> float:
    return float("nan") if t is None else t - t0
