"""Durable outbox: cost of fsync, and time to drain a backlog after a broker restart.

1. Journal throughput, durable (``synchronous=FULL``: every result commit is
   fsynced before the inbox file may be removed) vs without fsync, measured
   in the same run on the same disk: admit -> record_result
   -> mark_delivered for N synthetic results of realistic size. Prints both
   rates and their ratio.
2. Service throughput, durable vs without fsync, same run: the real service
   (bundled model, 2 workers, real Mosquitto) works through the same 120
   Kermany test JPEGs dropped at once; files/s until the last PUBACK.
3. Drain: 500 results are committed while the broker is down; the broker is
   started and the time until every one is acknowledged (PUBACK) is measured
   with the real publisher and a real Mosquitto.

Usage (from the repository root): python -m benchmarks.bench_outbox [--n 2000] [--backlog 500]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_runtime.config import MqttConfig
from edge_runtime.journal import Delivery, Journal
from edge_runtime.sinks import OutboxDrainer
from edge_runtime.sinks.mqtt import MqttSink

REPO = Path(__file__).resolve().parents[1]


def fake_result(i: int) -> dict:
    mid = hashlib.sha256(f"bench-{i}".encode()).hexdigest()
    return {"message_id": mid, "input": {"file_name": f"scan{i}.dcm", "pad": "x" * 1200}}


def journal_rate(folder: Path, n: int, durable: bool) -> float:
    journal = Journal(folder / f"journal-{'durable' if durable else 'nosync'}.sqlite3", durable=durable)
    t0 = time.perf_counter()
    for i in range(n):
        sha = hashlib.sha256(f"{durable}-{i}".encode()).hexdigest()
        record = journal.admit(sha, folder / f"scan{i}.dcm", 1000).record
        payload = json.dumps(fake_result(i))
        (message,) = journal.record_result(
            record.id, fake_result(i)["message_id"], payload, [Delivery("mqtt", "bench/results", payload, 1)]
        )
        journal.mark_delivered(message.seq)
    elapsed = time.perf_counter() - t0
    journal.close()
    return n / elapsed


def start_broker(workdir: Path, port: int) -> subprocess.Popen:
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def drain_time(folder: Path, backlog: int) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    journal = Journal(folder / "drain.sqlite3")
    for i in range(backlog):
        sha = hashlib.sha256(f"drain-{i}".encode()).hexdigest()
        record = journal.admit(sha, folder / f"d{i}.dcm", 1000).record
        result = fake_result(10**6 + i)
        payload = json.dumps(result)
        journal.record_result(
            record.id, result["message_id"], payload, [Delivery("mqtt", "bench/results", payload, 1)]
        )
    sink = MqttSink(MqttConfig(host="127.0.0.1", port=port, client_id="bench-drain"))
    publisher = OutboxDrainer(journal, sink)
    publisher.start()  # broker is down: everything waits in the outbox
    time.sleep(1.0)
    t0 = time.perf_counter()
    broker = start_broker(folder, port)
    try:
        if not sink.wait_connected(60):
            raise SystemExit("publisher did not connect")
        t_connected = time.perf_counter() - t0
        while journal.counts()["outbox_pending"]:
            time.sleep(0.005)
        t_drained = time.perf_counter() - t0
    finally:
        publisher.stop(timeout_s=2)
        broker.terminate()
        broker.wait(5)
    return t_connected, t_drained


def service_rate(folder: Path, port: int, sources: list[Path], durable: bool) -> float:
    from edge_runtime.config import RuntimeConfig
    from edge_runtime.service import EdgeService

    tag = "durable" if durable else "nosync"
    config = RuntimeConfig.from_mapping(
        {
            "Inbox": {
                "Path": str(folder / f"inbox-{tag}"),
                "QuarantinePath": str(folder / "q"),
                "SettleSeconds": 0.0,
                "RescanIntervalSeconds": 0.2,
            },
            "Mqtt": {"Host": "127.0.0.1", "Port": port, "ClientId": f"bench-{tag}"},
            "Journal": {"Path": str(folder / f"service-{tag}.sqlite3")},
            "Health": {"File": str(folder / f"health-{tag}.json")},
            "Workers": 2,
        }
    )
    service = EdgeService(config, journal=Journal(config.journal.path, durable=durable))
    service.start()
    assert service.mqtt is not None
    service.mqtt.wait_connected(10)
    staging = folder / f"staging-{tag}"
    staging.mkdir()
    for src in sources:
        shutil.copyfile(src, staging / src.name)
    t0 = time.perf_counter()
    for src in sources:
        (staging / src.name).rename(config.inbox.path / src.name)
    deadline = time.monotonic() + 600
    # Byte-identical images (the Kermany set has a few) are processed once: wait for the
    # inbox to empty and the outbox to drain rather than for a message count.
    while time.monotonic() < deadline and (
        any(config.inbox.path.iterdir())
        or service.journal.counts()["outbox_pending"]
        or service.counters["received"] < len(sources)
    ):
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    service.stop()
    return len(sources) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--backlog", type=int, default=500)
    parser.add_argument(
        "--dir", type=Path, default=None, help="folder on the disk to measure (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        durable = journal_rate(folder, args.n, durable=True)
        nosync = journal_rate(folder, args.n, durable=False)
        print(f"journal+outbox, {args.n} results each, same disk ({folder}):")
        print(f"  durable (fsync every commit): {durable:8.0f} results/s")
        print(f"  without fsync               : {nosync:8.0f} results/s")
        print(f"  ratio durable / no-fsync    : {durable / nosync:8.3f}")
        data = REPO.parent / "shared" / "data" / "cxr/kermany_pneumonia_224/test/PNEUMONIA"
        if data.is_dir():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            broker = start_broker(folder, port)
            try:
                sources = sorted(data.glob("*.jpeg"))[:120]
                rate_durable = service_rate(folder, port, sources, durable=True)
                rate_nosync = service_rate(folder, port, sources, durable=False)
            finally:
                broker.terminate()
                broker.wait(5)
            print(f"\nservice end to end, {len(sources)} JPEGs, 2 workers, bundled model:")
            print(f"  durable journal  : {rate_durable:6.1f} scans/s")
            print(f"  without fsync    : {rate_nosync:6.1f} scans/s")
            print(f"  ratio            : {rate_durable / rate_nosync:6.3f}")
        connected, drained = drain_time(folder, args.backlog)
        print(f"\nbroker restart with {args.backlog} results queued in the outbox:")
        print(f"  broker start -> connected      : {connected:6.2f} s")
        print(
            f"  broker start -> all PUBACKed   : {drained:6.2f} s "
            f"({args.backlog / max(drained - connected, 1e-9):.0f} results/s once connected)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
