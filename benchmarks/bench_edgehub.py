"""Results through edgeHub: how fast a backlog drains, and each message's time to acknowledgement.

The edgeHub sink hands one message at a time to the Azure IoT SDK, whose
``send_message_to_output`` returns only once edgeHub has acknowledged it (PUBACK);
the MQTT sink keeps up to 100 messages in flight on its own paho connection. Is one
at a time fast enough? Both drain the same backlog of de-identified results
(committed while the far end was down, as after an outage) to the same broker,
in the same run:

* **edgeHub**: the runtime's ``EdgeHubResultsSink`` with the unmodified
  ``azure-iot-device`` client, SAS token from the workload API, against the
  tests' fake edgeHub (Mosquitto with TLS on 127.0.0.1:8883, ``tests/edgehub.py``);
* **MQTT**: the runtime's ``MqttSink`` to that same Mosquitto listener, with TLS
  and the same CA.

It prints messages per second once connected, the acknowledgement latency
(p50, p95, from hand-over to the drainer's confirmation) and the CPU. A result
every second is a busy site; the question is the margin above that after an outage.

Usage (from the repository root): python -m benchmarks.bench_edgehub [--backlog 500] [--rounds 3]
Needs Mosquitto and port 8883 free (the SDK's port is fixed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_runtime.azure_edge import EdgeHubModule
from edge_runtime.config import MqttConfig, TlsConfig
from edge_runtime.cpu import cpu_summary
from edge_runtime.journal import Delivery, Journal, OutboxMessage
from edge_runtime.sinks import OutboxDrainer
from edge_runtime.sinks.edgehub import EdgeHubResultsSink
from edge_runtime.sinks.mqtt import MqttSink

REPO = Path(__file__).resolve().parents[1]
# The fake edgeHub is the tests' fixture: the same protocol the module tests check.
sys.path.insert(0, str(REPO / "tests"))
from edgehub import FakeEdgeHub  # noqa: E402


def cloud_like_result(i: int) -> dict[str, Any]:
    """A de-identified result of the size the results output carries (about 1.5 KB)."""
    mid = hashlib.sha256(f"bench-edgehub-{i}".encode()).hexdigest()
    return {
        "message_id": mid,
        "schema": "healthdiag.result/1",
        "findings": [{"label": "PNEUMONIA", "probability": 0.73, "threshold": 0.5, "positive": True}],
        "model": {"name": "pneumonia-cxr", "version": "0.4.0", "backend": "onnxruntime"},
        "input": {"kind": "dicom", "modality": "CR", "rows": 2048, "columns": 2048},
        "pad": "x" * 1200,
    }


def fill(journal: Journal, sink: str, topic: str, n: int, folder: Path) -> None:
    for i in range(n):
        sha = hashlib.sha256(f"{sink}-{i}".encode()).hexdigest()
        record = journal.admit(sha, folder / f"{sink}-{i}.dcm", 1000).record
        result = cloud_like_result(i)
        payload = json.dumps(result)
        journal.record_result(record.id, result["message_id"], payload, [Delivery(sink, topic, payload, 1)])


def drain(journal: Journal, sink: Any, n: int, connected: Any) -> tuple[float, list[float]]:
    """Seconds from the sink connected to every message confirmed, and each one's ack latency."""
    latencies: list[float] = []

    def on_delivered(message: OutboxMessage, latency: float) -> None:
        latencies.append(latency)

    drainer = OutboxDrainer(journal, sink, on_delivered=on_delivered)
    drainer.start()
    try:
        deadline = time.monotonic() + 60
        while not connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        drainer.notify()
        while journal.counts()["outbox_pending"] and time.monotonic() < deadline + 600:
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
    finally:
        drainer.stop(timeout_s=2)
    if len(latencies) != n:
        raise SystemExit(f"only {len(latencies)} of {n} messages were confirmed")
    return elapsed, latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=500, help="results queued before each drain")
    parser.add_argument("--rounds", type=int, default=3, help="drains per sink, alternated (A B A B)")
    args = parser.parse_args()
    cpu = cpu_summary()
    print(f"CPU: {cpu.get('model')} | flags: {cpu.get('int8_features')} | cores: {os.cpu_count()}")
    rates: dict[str, list[float]] = {"edgehub": [], "mqtt": []}
    acks: dict[str, list[float]] = {"edgehub": [], "mqtt": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        hub = FakeEdgeHub(folder / "hub")
        hub.start()
        saved = dict(os.environ)
        os.environ.update(hub.environ())
        try:
            module = EdgeHubModule()
            module.connect(timeout_s=20)
            ca = folder / "ca.pem"
            ca.write_text(hub.ca_pem)
            for round_no in range(args.rounds):
                for name in ("edgehub", "mqtt"):
                    journal = Journal(folder / f"{name}-{round_no}.sqlite3")
                    fill(journal, name, "results", args.backlog, folder)
                    if name == "edgehub":
                        sink: Any = EdgeHubResultsSink(module)
                        connected = lambda: module.connected  # noqa: E731
                    else:
                        sink = MqttSink(
                            MqttConfig(
                                host="localhost",
                                port=8883,
                                client_id=f"bench-mqtt-{round_no}",
                                tls=TlsConfig(enabled=True, ca_file=ca),
                            )
                        )
                        connected = lambda s=sink: s.connected  # noqa: E731
                    elapsed, latencies = drain(journal, sink, args.backlog, connected)
                    journal.close()
                    rates[name].append(args.backlog / elapsed)
                    acks[name].extend(latencies)
            module.close()
        finally:
            os.environ.clear()
            os.environ.update(saved)
            hub.stop()
    print(
        f"\n{args.backlog} de-identified results (~1.5 KB) drained, {args.rounds} rounds each, "
        "same broker and TLS:"
    )
    for name, label in (
        ("edgehub", "edgeHub output (azure-iot-device)"),
        ("mqtt", "MQTT sink (paho, 100 in flight)"),
    ):
        print(
            f"  {label:36s} {statistics.median(rates[name]):7.0f} msg/s (median of {args.rounds}: "
            f"{', '.join(f'{r:.0f}' for r in rates[name])}); ack p50 {pct(acks[name], 0.5):6.1f} ms, "
            f"p95 {pct(acks[name], 0.95):6.1f} ms"
        )
    ratio = statistics.median(rates["edgehub"]) / statistics.median(rates["mqtt"])
    print(f"  edgeHub / MQTT drain rate: {ratio:.3f}")
    print(
        f"  a day of a busy site (one result per second, 86 400) drains through edgeHub in "
        f"{86400 / statistics.median(rates['edgehub']) / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
