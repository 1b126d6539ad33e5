"""One run of the benchmark from parsed arguments: set-up, the parts asked for, the report, the files.

Apart from the entry point (:mod:`benchmarks.bench_throughput`, the command line) so that the
order of a run reads top to bottom here: the environment, the inputs, the broker, the services
and the floor pool started and warmed up, each part measured, then everything printed and saved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.throughput.common import REPO, BenchError, say
from benchmarks.throughput.floor import FloorPool, floor_init
from benchmarks.throughput.inputs import CopyMaker, prepare_sources
from benchmarks.throughput.measure import measure_backends, measure_latency, measure_scale, measure_throughput
from benchmarks.throughput.memory import HAS_PSUTIL
from benchmarks.throughput.plot import plot
from benchmarks.throughput.report import (
    print_backends,
    print_latency,
    print_scale,
    print_targets,
    print_throughput,
)
from benchmarks.throughput.services import InProcessService, broker_running, route_service_logs
from edge_runtime.cpu import cpu_summary


def environment() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for module in ("numpy", "onnxruntime", "cv2", "pydicom", "paho.mqtt", "ai_edge_litert"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            versions[module] = str(getattr(mod, "__version__", "?"))
        except Exception:
            versions[module] = "not installed"
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {"versions": versions, "commit": commit, "cores": os.cpu_count(), "loadavg_start": os.getloadavg()}


def run(args: argparse.Namespace) -> int:
    """Everything ``args`` asks for (the command line's :func:`~benchmarks.bench_throughput.parse_args`)."""
    if not args.data.is_dir():
        raise BenchError(f"data folder {args.data} not found (pass --data)")
    args.out.mkdir(parents=True, exist_ok=True)
    from edge_runtime.bundle import default_bundle_path
    from edge_runtime.config import RuntimeConfig

    cpu = dict(cpu_summary())
    env = environment()
    defaults = RuntimeConfig()
    say(
        f"CPU: {cpu['model']} ({cpu['machine']}), {env['cores']} cores; INT8 features: "
        f"{', '.join(cpu['int8_features']) or 'none'}; u8 x s8 dot: {cpu['int8_dot']}"
    )
    say(
        f"commit {env['commit']}; load average at start {env['loadavg_start'][0]:.2f}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    )
    say(
        f"{'--quick, ' if args.quick else ''}{args.workers} workers, model threads {defaults.model.threads}, "
        f"backend {defaults.model.backend}, psutil {'yes' if HAS_PSUTIL else 'no (/proc)'}"
    )
    results: dict[str, Any] = {
        "cpu": cpu,
        "environment": env,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp_name:
        work = Path(tmp_name)
        sources = prepare_sources(args.data, work / "sources", args.kinds)
        kinds = [k for k in args.kinds if k in sources]
        if not kinds:
            raise BenchError("no input kind available")
        maker = CopyMaker(sources)
        bundle_path = str(args.bundle or default_bundle_path())
        with broker_running(work) as port:
            if "throughput" in args.parts or "latency" in args.parts:
                route_service_logs(args.log_level, args.out / "service-inprocess.log")
                init = (
                    bundle_path,
                    defaults.model.backend,
                    defaults.model.threads,
                    defaults.decode.max_pixels,
                    [str(sources[k]) for k in kinds],
                )
                floor = FloorPool(args.workers, init) if "throughput" in args.parts else None
                floor_init(*init)  # the single-scan floor, in this process
                services = {
                    "service": InProcessService(work / "svc", port, args.workers, True, "svc"),
                    "service_no_reports": InProcessService(work / "svc0", port, args.workers, False, "svc0"),
                }
                try:
                    for svc in services.values():
                        svc.start()
                    time.sleep(1.0)  # decoder children started
                    for svc in services.values():  # warm-up: every kind through every worker
                        for key in kinds:
                            svc.drop(maker.many(key, args.workers), timeout_s=300)
                    if floor is not None:
                        results["throughput"] = measure_throughput(args, kinds, maker, floor, services, work)
                    if "latency" in args.parts:
                        results["latency"] = measure_latency(args, kinds, maker, services, work)
                finally:
                    for svc in services.values():
                        svc.stop()
                    if floor is not None:
                        floor.close()
            if "backends" in args.parts:
                results["backends"] = measure_backends(args, sources.get("jpeg") or sources[kinds[0]])
            if "scale" in args.parts:
                if "jpeg" in sources:
                    results["scale"] = measure_scale(args, kinds, maker, port, work, args.out)
                else:
                    say("skipped scale: needs the JPEG input")
    results["environment"]["loadavg_end"] = os.getloadavg()

    say("\n" + "=" * 100)
    say(
        f"RESULTS  CPU {cpu['model']}, {env['cores']} cores, INT8 features "
        f"{', '.join(cpu['int8_features']) or 'none'}; load average start {env['loadavg_start'][0]:.2f}, "
        f"end {results['environment']['loadavg_end'][0]:.2f}{'  (--quick)' if args.quick else ''}"
    )
    if "throughput" in results:
        print_throughput(results["throughput"], args.workers)
    if "latency" in results:
        print_latency(results["latency"])
    if "backends" in results:
        print_backends(results["backends"], cpu)
    if "scale" in results:
        print_scale(results["scale"])
    results["targets"] = print_targets(results)
    json_path = args.out / "bench_throughput.json"
    json_path.write_text(json.dumps(results, indent=1, default=_json_default) + "\n", encoding="utf-8")
    title = (
        f"bench_throughput {env['commit']} {'--quick ' if args.quick else ''}| {cpu['model']}, "
        f"{env['cores']} cores, {', '.join(cpu['int8_features'])} | load {env['loadavg_start'][0]:.1f}"
    )
    say(f"\nnumbers: {json_path}")
    say(plot(results, args.out / "bench_throughput.png", title))
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
