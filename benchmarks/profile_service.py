"""Where the service's time goes: a burst of scans through the running service, and its floor.

Drops ``--jpeg`` distinct Kermany JPEG copies and ``--dicom`` distinct
``RG1_UNCR.dcm`` copies (copies differ where identity lives, see
:func:`benchmarks.bench_latency.make_copies`) into the inbox of an in-process
service (real Mosquitto, default configuration: sandboxed decoding, reports
on, durable journal), as ``NAME.part`` then renamed, and waits until every
result is acknowledged by the broker. It prints scans/s, the stage timings
the runtime measured (medians from the journal's results), and the floor:
the same ``decode_file -> preprocess -> backend.infer`` calls in a process
pool of ``--workers`` on the same files.

Run it under a sampling profiler to see the rest::

    py-spy record --subprocesses --format raw -r 200 -o /tmp/svc.txt -- \\
        python -m benchmarks.profile_service --jpeg 200 --dicom 30
    python -m benchmarks.profile_service --summarize /tmp/svc.txt

Usage (from the repository root):
    python -m benchmarks.profile_service [--jpeg 200] [--dicom 30] [--workers 2] [--no-floor]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
JPEG = "cxr/kermany_pneumonia_224/test/PNEUMONIA/person1_virus_6.jpeg"
DICOM = "dicom/pydicom_data/RG1_UNCR.dcm"

_FLOOR: dict[str, Any] = {}


def _floor_init() -> None:
    from edge_runtime.bundle import default_bundle_path
    from edge_runtime.pipeline import ScanAnalyzer

    _FLOOR["analyzer"] = ScanAnalyzer.from_bundle_path(default_bundle_path())


def _floor_one(path: str) -> float:
    import numpy as np

    from edge_runtime.decode import decode_file
    from edge_runtime.preprocess import preprocess

    analyzer = _FLOOR["analyzer"]
    t0 = time.perf_counter()
    decoded = decode_file(path)
    batch = np.empty((1, *analyzer.bundle.preprocessing.sample_shape), np.float32)
    preprocess(decoded.pixels, analyzer.bundle.preprocessing, out=batch[0])
    analyzer.backend.infer(batch)
    return time.perf_counter() - t0


def floor_rate(paths: list[Path], workers: int) -> float:
    with mp.get_context("spawn").Pool(workers, initializer=_floor_init) as pool:
        pool.map(_floor_one, [str(p) for p in paths[: workers * 2]])  # warm
        t0 = time.perf_counter()
        pool.map(_floor_one, [str(p) for p in paths], chunksize=1)
        return len(paths) / (time.perf_counter() - t0)


def service_run(copies: list[Path], tmp: Path, port: int, workers: int) -> dict[str, Any]:
    from edge_runtime.config import RuntimeConfig
    from edge_runtime.service import EdgeService

    config = RuntimeConfig.from_mapping(
        {
            "Inbox": {
                "Path": str(tmp / "inbox"),
                "QuarantinePath": str(tmp / "q"),
                "SettleSeconds": 1.0,
                "RescanIntervalSeconds": 5.0,
            },
            "Mqtt": {"Host": "127.0.0.1", "Port": port, "ClientId": f"prof-{tmp.name}"},
            "Journal": {"Path": str(tmp / "journal.sqlite3")},
            "Health": {"File": str(tmp / "health.json")},
            "Logging": {"Level": "WARNING"},
            "Workers": workers,
        }
    )
    service = EdgeService(config)
    service.start()
    assert service.mqtt is not None
    service.mqtt.wait_connected(10)
    parts = []
    for copy in copies:
        part = config.inbox.path / (copy.name + ".part")
        shutil.copyfile(copy, part)
        parts.append(part)
    time.sleep(1.5)  # decoder children warm, .part files seen and ignored
    t0 = time.perf_counter()
    for part in parts:
        part.rename(part.with_suffix(""))
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and (
        any(config.inbox.path.iterdir())
        or service.journal.outbox_pending()
        or service.counters.get("processed", 0) < len(copies)
    ):
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    rows = service.journal._query("SELECT result_json FROM inputs WHERE result_json IS NOT NULL")
    counters = dict(service.counters)
    service.stop()
    timings: dict[str, list[float]] = collections.defaultdict(list)
    for (text,) in rows:
        for key, value in json.loads(text)["timings_ms"].items():
            timings[key].append(value)
    return {"elapsed_s": elapsed, "n": len(copies), "counters": counters, "timings": timings}


def summarize(path: Path, top: int = 45) -> None:
    """Inclusive sample counts per function (one count per stack) from py-spy's raw output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        seen = set()
        for frame in frames:
            name = frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1].split(":")[0].rstrip(")")
            if name not in seen:
                inclusive[name] += count
                seen.add(name)
        last = frames[-1]
        own[last.split(" (")[0] + " " + last.rsplit("/", 1)[-1].split(":")[0].rstrip(")")] += count
    print(f"{total} samples")
    print("inclusive:")
    for name, count in inclusive.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {name}")
    print("self:")
    for name, count in own.most_common(25):
        print(f"  {100 * count / total:5.1f}%  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jpeg", type=int, default=200)
    parser.add_argument("--dicom", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--summarize", type=Path, help="summarise a py-spy --format raw file and exit")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return 0
    logging.basicConfig(level=logging.WARNING)
    from benchmarks.bench_latency import make_copies, start_broker

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker, port = start_broker(tmp)
        try:
            for label, rel, n in (("jpeg", JPEG, args.jpeg), ("dicom", DICOM, args.dicom)):
                if n <= 0:
                    continue
                copies = make_copies(args.data / rel, tmp / f"staging-{label}", n)
                run = service_run(copies, tmp / f"svc-{label}", port, args.workers)
                rate = run["n"] / run["elapsed_s"]
                line = f"{label}: service {rate:7.1f} scans/s ({run['n']} in {run['elapsed_s']:.2f} s)"
                if not args.no_floor:
                    floor = floor_rate(copies, args.workers)
                    line += f", floor {floor:7.1f} scans/s, service/floor {rate / floor:.2f}"
                print(line, flush=True)
                stages = {k: statistics.median(v) for k, v in run["timings"].items()}
                print("  median stage ms: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        finally:
            broker.terminate()
            broker.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
