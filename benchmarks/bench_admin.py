"""The admin page's cost: what its libraries add to the service's memory, and how fast it answers.

Two numbers an admin or a fleet owner asks about a page served by the box itself:

* **memory**: the proportional set size (PSS, from /proc/self/smaps_rollup) of a fresh
  interpreter after importing the service (what it loads with ``Admin.Enabled: false``), then
  after importing the admin package too (Starlette, uvicorn, Jinja2, python-multipart,
  itsdangerous), each in its own process, ``--rounds`` times;
* **latency**: a running service (the bundled model, MQTT off, ``--scans`` real scans in its
  journal) answers ``--requests`` requests to each endpoint over loopback, one at a time,
  as a scraper or a browser tab does; p50 and p95 per endpoint.

Usage (from the repository root): python -m benchmarks.bench_admin [--requests 200] [--scans 20]
Needs ../shared/data for the scans.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from edge_runtime.config import RuntimeConfig
from edge_runtime.cpu import cpu_summary
from edge_runtime.service import EdgeService

REPO = Path(__file__).resolve().parents[1]
SCANS = REPO.parent / "shared" / "data" / "cxr" / "kermany_pneumonia_224" / "test"
ENDPOINTS = (
    "/health/live",
    "/health/ready",
    "/api/status",
    "/metrics",
    "/",
    "/scans",
    "/quarantine",
    "/logs",
)

_PSS = """
import sys
def pss():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
import edge_runtime.service  # everything the service imports with Admin.Enabled false
before = pss()
if sys.argv[1] == "admin":
    import edge_runtime.admin
print(before, pss())
"""


def memory(rounds: int) -> tuple[float, float]:
    """Median PSS (MB) of the service's modules without and with the admin package."""
    without, with_admin = [], []
    for _ in range(rounds):
        for kind, sink in (("plain", without), ("admin", with_admin)):
            out = subprocess.run(
                [sys.executable, "-c", _PSS, kind], capture_output=True, text=True, check=True, cwd=REPO
            ).stdout.split()
            sink.append(float(out[1]))
    return statistics.median(without), statistics.median(with_admin)


def latency(requests: int, scans: int) -> dict[str, tuple[float, float]]:
    root = Path(tempfile.mkdtemp(prefix="bench-admin-"))
    try:
        config = RuntimeConfig.from_mapping(
            {
                "Inbox": {
                    "Path": str(root / "inbox"),
                    "QuarantinePath": str(root / "quarantine"),
                    "ProcessedPath": str(root / "processed"),
                    "SettleSeconds": 0.2,
                },
                "Journal": {"Path": str(root / "state" / "journal.sqlite3")},
                "Health": {"File": str(root / "state" / "health.json")},
                "Mqtt": {"Enabled": False},
                "Admin": {"Port": 0},
            }
        )
        service = EdgeService(config)
        service.start()
        try:
            files = sorted(SCANS.glob("*/*.jpeg"))[:scans]
            config.inbox.path.mkdir(parents=True, exist_ok=True)
            for src in files:
                shutil.copyfile(src, config.inbox.path / src.name)
            deadline = time.monotonic() + 300
            while service.counters["processed"] < len(files) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert service.admin is not None
            timings: dict[str, tuple[float, float]] = {}
            with httpx.Client(base_url=service.admin.url, timeout=30) as client:
                for path in ENDPOINTS:
                    samples = []
                    for _ in range(requests):
                        t0 = time.perf_counter()
                        response = client.get(path, headers={"accept": "text/html"})
                        samples.append((time.perf_counter() - t0) * 1000)
                        response.raise_for_status()
                    samples.sort()
                    timings[path] = (statistics.median(samples), samples[int(0.95 * (len(samples) - 1))])
            return timings
        finally:
            service.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per endpoint (default 200)")
    parser.add_argument("--scans", type=int, default=20, help="real scans in the journal first (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="processes per memory reading (default 5)")
    args = parser.parse_args()
    cpu = cpu_summary()
    features = ", ".join(cpu["int8_features"]) or "none"
    print(f"CPU: {cpu['model']} ({cpu['machine']}); INT8 features: {features}; int8 dot: {cpu['int8_dot']}")
    plain, admin = memory(args.rounds)
    print(
        f"PSS of the service's modules: {plain:.1f} MB; with the admin package: {admin:.1f} MB "
        f"(+{admin - plain:.1f} MB), median of {args.rounds} processes each"
    )
    if not SCANS.is_dir():
        print(f"latency skipped: {SCANS} not found")
        return
    timings = latency(args.requests, args.scans)
    print(
        f"latency over loopback, {args.requests} sequential requests each, {args.scans} scans in the journal:"
    )
    for path, (p50, p95) in timings.items():
        print(f"  {path:<16} p50 {p50:6.2f} ms   p95 {p95:6.2f} ms")
    print(json.dumps({"pss_mb": {"plain": plain, "admin": admin}, "latency_ms": timings}))


if __name__ == "__main__":
    main()
