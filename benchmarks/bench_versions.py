"""Service throughput of this checkout against another one (e.g. before a refactor), in one run.

Each side runs in its own process, from its own tree (``PYTHONPATH=<tree>``),
on the same machine, the same real Mosquitto and the same Kermany test JPEGs
dropped into a fresh inbox at once; scans/s is counted from the first drop to
the moment the inbox is empty and every result is acknowledged by the
broker. Rounds alternate A, B, A, B... so that a busy moment of the machine
hurts both sides alike; the medians and their ratio are printed with the
CPU's flags.

Usage:
    git worktree add /tmp/before <commit>
    python -m benchmarks.bench_versions --other /tmp/before [--n 120] [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from edge_runtime.cpu import cpu_summary

REPO = Path(__file__).resolve().parents[1]

# Runs inside each tree's own interpreter path; it only uses API both sides have.
_DRIVER = textwrap.dedent(
    """
    import json, shutil, sys, time
    from pathlib import Path
    from edge_runtime.config import RuntimeConfig
    from edge_runtime.service import EdgeService

    folder, port, workers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    sources = [Path(p) for p in json.loads(sys.argv[4])]
    config = RuntimeConfig.from_mapping({
        "Inbox": {"Path": str(folder / "inbox"), "QuarantinePath": str(folder / "q"),
                  "SettleSeconds": 0.0, "RescanIntervalSeconds": 0.2},
        "Mqtt": {"Host": "127.0.0.1", "Port": port, "ClientId": f"bench-{folder.name}"},
        "Journal": {"Path": str(folder / "journal.sqlite3")},
        "Health": {"File": str(folder / "health.json")},
        "Logging": {"Level": "WARNING"},
        "Workers": workers,
    })
    service = EdgeService(config)
    service.start()
    mqtt = getattr(service, "mqtt", None) or getattr(service, "publisher")
    mqtt.wait_connected(10)
    staging = folder / "staging"
    staging.mkdir()
    for src in sources:
        shutil.copyfile(src, staging / src.name)
    time.sleep(1.0)  # workers warm
    t0 = time.perf_counter()
    for src in sources:
        (staging / src.name).rename(config.inbox.path / src.name)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (
        any(config.inbox.path.iterdir()) or service.journal.counts()["outbox_pending"]
        or service.counters["received"] < len(sources)
    ):
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    service.stop()
    print(json.dumps({"scans_per_s": len(sources) / elapsed, "elapsed_s": elapsed}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_side(tree: Path, folder: Path, port: int, workers: int, sources: list[Path]) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _DRIVER,
            str(folder),
            str(port),
            str(workers),
            json.dumps(list(map(str, sources))),
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if out.returncode != 0:
        raise SystemExit(f"{tree} failed:\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["scans_per_s"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--other", type=Path, required=True, help="the other checkout (B), e.g. a worktree")
    parser.add_argument("--n", type=int, default=120, help="JPEGs per round (default 120)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--dicom",
        type=Path,
        default=None,
        help="instead of the JPEGs: N copies of this DICOM file, each with its own SOP Instance UID "
        "(relative to --data, e.g. dicom/pydicom_data/RG1_UNCR.dcm)",
    )
    args = parser.parse_args()
    folder = args.data / "cxr/kermany_pneumonia_224/test/PNEUMONIA"
    if not folder.is_dir():
        raise SystemExit(f"test images not found at {folder}")
    sources = sorted(folder.glob("*.jpeg"))[: args.n]
    what = "Kermany JPEGs"
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.dicom is not None:
            from benchmarks.bench_latency import make_copies

            sources = make_copies(args.data / args.dicom, root / "copies", args.n)
            what = f"copies of {args.dicom.name}"
        (root / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        broker = subprocess.Popen(
            ["mosquitto", "-c", str(root / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            rates: dict[str, list[float]] = {"A (this checkout)": [], f"B ({args.other})": []}
            trees = {"A (this checkout)": REPO, f"B ({args.other})": args.other.resolve()}
            for i in range(args.rounds):
                for label, tree in trees.items():
                    rate = run_side(tree, root / f"{i}-{label[0]}", port, args.workers, sources)
                    rates[label].append(rate)
                    print(f"round {i + 1} {label}: {rate:6.1f} scans/s", flush=True)
        finally:
            broker.terminate()
            broker.wait(5)
    cpu = cpu_summary()
    print(f"\nCPU: {cpu.get('model')} ({', '.join(cpu.get('int8_features', []))}), {os.cpu_count()} cores")
    print(f"{len(sources)} {what} a round, {args.workers} workers, real Mosquitto, {args.rounds} rounds")
    medians = {label: statistics.median(values) for label, values in rates.items()}
    for label, value in medians.items():
        print(f"  {label:40s} median {value:6.1f} scans/s")
    a, b = medians.values()
    print(f"  ratio A / B: {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
