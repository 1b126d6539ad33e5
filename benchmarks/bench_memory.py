"""Memory of the whole service, process by process: after start, at the peak of a burst, idle after it.

Issue 30's measurement. ``edge-runtime run`` (the real CLI, reports on: DICOM SR, FHIR, heat-map)
with a real Mosquitto takes a burst of large uncompressed DICOMs (RG1_UNCR, 1955x1841) and Kermany
JPEGs; every 0.1 s the process tree is read from ``/proc``: PSS (each shared page divided among the
processes that map it, so the sum is what the tree costs the box) and RSS per process. Each process
is named by its role: the service, the forkserver, the resource tracker, and the children by the
name they give themselves (``edge-decoder``, ``edge-reports``; :mod:`edge_runtime.procname`).

``--decode-processes 0 1`` (the default) measures one decoder child per worker, then one shared
decoder child, one after the other in the same run.

Printed: per role, PSS and RSS after start (idle, before any scan), at the burst's peak (the sample
with the largest PSS sum) and idle again ``--idle-s`` after the last result; the totals; the CPU.

Usage (repository root): ``python -m benchmarks.bench_memory [--dicoms 30] [--jpegs 200] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.throughput.inputs import CopyMaker, prepare_sources
from benchmarks.throughput.memory import process_tree
from benchmarks.throughput.services import ServiceProcess, broker_running
from edge_runtime.cpu import cpu_summary

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data")
    parser.add_argument("--dicoms", type=int, default=30, help="large uncompressed DICOMs in the burst")
    parser.add_argument("--jpegs", type=int, default=200, help="224 px JPEGs in the burst")
    parser.add_argument("--workers", type=int, default=2, help="service workers")
    parser.add_argument("--idle-s", type=float, default=20.0, help="wait after the burst before 'idle'")
    parser.add_argument(
        "--decode-processes",
        type=int,
        nargs="+",
        default=[0, 1],
        help="Decode.Processes values, measured one after the other in this run (0: one per worker)",
    )
    parser.add_argument(
        "--report-idle-s",
        type=float,
        default=0.0,
        help="Reports.ChildIdleSeconds for every run (0: the report child stays; below --idle-s it is "
        "gone at 'idle')",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser.parse_args()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def role(pid: int, service_pid: int) -> str:
    """What a process of the tree is: from its name (children) or its command line."""
    if pid == service_pid:
        return "service"
    comm = _read(Path(f"/proc/{pid}/comm")).strip()
    if comm.startswith("edge-"):
        return comm
    cmdline = _read(Path(f"/proc/{pid}/cmdline")).replace("\0", " ")
    if "forkserver" in cmdline:
        return "forkserver"
    if "resource_tracker" in cmdline:
        return "resource-tracker"
    return comm or str(pid)


def _kb(pid: int) -> tuple[float, float]:
    """(PSS, RSS) in MB."""
    pss = rss = 0.0
    for line in _read(Path(f"/proc/{pid}/smaps_rollup")).splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1]) / 1024
        elif line.startswith("Rss:"):
            rss = int(line.split()[1]) / 1024
    return pss, rss


def snapshot(service_pid: int) -> dict[str, dict[str, float]]:
    """Role -> {pss, rss, processes}, summed over the processes of that role."""
    out: dict[str, dict[str, float]] = {}
    for pid in process_tree(service_pid):
        pss, rss = _kb(pid)
        row = out.setdefault(role(pid, service_pid), {"pss": 0.0, "rss": 0.0, "processes": 0})
        row["pss"] += pss
        row["rss"] += rss
        row["processes"] += 1
    return out


def total(snap: dict[str, dict[str, float]], key: str) -> float:
    return sum(row[key] for row in snap.values())


class Sampler:
    """The snapshot with the largest PSS total, every 0.1 s while running."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            snap = snapshot(self.pid)
            if total(snap, "pss") > total(self.peak, "pss"):
                self.peak = snap

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def measure(args: argparse.Namespace, processes: int) -> dict[str, Any]:
    """One service run with ``Decode.Processes`` = ``processes``: its snapshots and the burst's time."""
    os.environ["EDGE_RUNTIME__DECODE__PROCESSES"] = str(processes)
    os.environ["EDGE_RUNTIME__REPORTS__CHILD_IDLE_SECONDS"] = str(args.report_idle_s)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        sources = prepare_sources(args.data, work / "sources", ["uncompressed", "jpeg"])
        if set(sources) != {"uncompressed", "jpeg"}:
            raise SystemExit("skipped: the shared data's RG1_UNCR.dcm or Kermany JPEG is missing")
        maker = CopyMaker(sources)
        burst = maker.many("uncompressed", args.dicoms) + maker.many("jpeg", args.jpegs)
        with broker_running(work) as port:
            root = work / "service"
            (root / "inbox").mkdir(parents=True)
            service = ServiceProcess(root, port, args.workers, work)
            subscriber = service.start()
            try:
                with subscriber.cond:
                    if not subscriber.cond.wait_for(lambda: subscriber.first_online() is not None, 120):
                        raise SystemExit(f"the service did not come online (log: {service.log_path})")
                time.sleep(3.0)  # children started and warmed up
                assert service.proc is not None
                pid = service.proc.pid
                started = snapshot(pid)
                with Sampler(pid) as sampler:
                    t0 = time.perf_counter()
                    result = service.drop(subscriber, burst, timeout_s=900)
                    seconds = time.perf_counter() - t0
                time.sleep(args.idle_s)
                idle = snapshot(pid)
            finally:
                service.stop()
                subscriber.close()
    return {
        "decode_processes": processes,
        "results": len(result.acked),
        "seconds": seconds,
        "started": started,
        "peak": sampler.peak,
        "idle": idle,
    }


def _cell(snap: dict[str, dict[str, float]], name: str) -> str:
    row = snap.get(name)
    if row is None:
        return "-"
    n = f" ({row['processes']:.0f})" if row["processes"] > 1 else ""
    return f"{row['pss']:.0f} / {row['rss']:.0f}{n}"


def print_run(args: argparse.Namespace, run: dict[str, Any]) -> None:
    phases = [run["started"], run["peak"], run["idle"]]
    roles = sorted({r for snap in phases for r in snap}, key=lambda r: -run["peak"].get(r, {}).get("pss", 0))
    label = run["decode_processes"] or "one per worker"
    rate = run["results"] / run["seconds"]
    print(
        f"\nDecode.Processes {label}, Reports.ChildIdleSeconds {args.report_idle_s:g}: "
        f"{args.dicoms} DICOM RG1_UNCR + {args.jpegs} JPEG, {run['results']} results in "
        f"{run['seconds']:.1f} s ({rate:.1f}/s), {args.workers} workers, reports on\n"
    )
    print("| process | started PSS / RSS MB | peak PSS / RSS MB | idle PSS / RSS MB |")
    print("|---|---|---|---|")
    for name in roles:
        print(f"| {name} | " + " | ".join(_cell(snap, name) for snap in phases) + " |")
    print(
        "| **total** | "
        + " | ".join(f"**{total(s, 'pss'):.0f}** / {total(s, 'rss'):.0f}" for s in phases)
        + " |"
    )


def main() -> int:
    args = parse_args()
    cpu = cpu_summary()
    print(f"CPU: {cpu['model']}; INT8 features: {', '.join(cpu['int8_features'])}; {os.cpu_count()} CPUs")
    runs = [measure(args, processes) for processes in args.decode_processes]
    for run in runs:
        print_run(args, run)
    if args.json is not None:
        record = {"cpu": cpu, "burst": {"dicoms": args.dicoms, "jpegs": args.jpegs}, "runs": runs}
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
