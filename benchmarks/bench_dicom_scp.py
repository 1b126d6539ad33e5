"""The DICOM receiver: associations per second, and storescu-to-MQTT-result latency.

Two measurements, both with dcmtk's ``storescu`` as the sender (a separate
process, as a modality is):

1. **Associations per second** the C-STORE SCP sustains: N associations, each
   sending one small object (a 16x16 CR, 2.3 kB) with K senders at a time,
   against the receiver alone (no pipeline behind it, so the number is the
   receiver's: association set-up, write + fsync + rename + directory fsync,
   the journal receipt's fsync). The ``storescu`` process start is in the
   figure (about what a modality's own client costs per association). dcmtk
   3.6 leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is in its
   environment; with it on, each small DIMSE message waits for the
   receiver's delayed ACK (about 40 ms on Linux), so both are shown: the
   difference is the sender's socket setting, not the receiver.
2. **End-to-end latency** from ``storescu`` start to the result arriving at a
   real MQTT subscriber, to the SR (and heat-map) stored at a real C-STORE SCP
   (pynetdicom, in this process) acting as the PACS, and to the FHIR report on
   its MQTT topic, for an uncompressed (Explicit VR LE, 7.2 MB) and a
   JPEG 2000 lossless (4.3 MB) copy of the same 1955x1841 chest CR (WG04 RG1),
   one at a time (no queueing), through the whole service with the given
   model (default: the bundled one). Each copy has a new SOP Instance UID so
   nothing is skipped as a repeat; copies are made before the timed loop.

Starts its own Mosquitto on a free port. Usage (from the repository root):

    python -m benchmarks.bench_dicom_scp [--associations 200] [--concurrency 1,4]
        [--repeats 10] [--data ../shared/data] [--bundle PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from benchmarks.bench_latency import free_port, make_copies, pct, start_broker
from edge_runtime.config import RuntimeConfig
from edge_runtime.cpu import cpu_summary
from edge_runtime.journal import Journal
from edge_runtime.service import EdgeService
from edge_runtime.sources.dicom_scp import DicomScpSource

REPO = Path(__file__).resolve().parents[1]
AE = "HEALTHDIAG"
SMALL = "dicom/pydicom_testfiles/CR1_6154_cspine_16x16.dcm"
LATENCY_INPUTS = {
    "uncompressed (Explicit VR LE, 7.2 MB)": ("dicom/pydicom_data/RG1_UNCR.dcm", ()),
    "JPEG 2000 lossless (4.3 MB)": ("dicom/pydicom_data/RG1_J2KR.dcm", ("-xv",)),
}


def storescu_binary() -> str:
    """dcmtk's storescu (``storescu`` on PATH may be pynetdicom's app of the same name)."""
    for candidate in ("/usr/bin/storescu", shutil.which("storescu")):
        if candidate and os.path.exists(candidate):
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return candidate
    raise SystemExit("dcmtk storescu not found (apt-get install dcmtk)")


def send(binary: str, port: int, path: Path, options: tuple[str, ...] = (), nodelay: bool = False) -> None:
    """One association sending ``path``; ``nodelay``: storescu with TCP_NODELAY=1 (Nagle off)."""
    env = dict(os.environ, TCP_NODELAY="1") if nodelay else None
    proc = subprocess.run(
        [binary, "-aet", "BENCH", "-aec", AE, *options, "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"storescu failed ({proc.returncode}): {proc.stderr.strip()}")


def associations_per_second(
    binary: str, data: Path, tmp: Path, n: int, concurrency: int, nodelay: bool
) -> tuple[float, float]:
    """(associations/s, p95 ms per association) for the receiver alone."""
    root = tmp / f"rate-{concurrency}-{nodelay}"
    config = RuntimeConfig.from_mapping(
        {
            "Inbox": {"Path": str(root / "inbox"), "QuarantinePath": str(root / "q")},
            "Dicom": {
                "Enabled": True,
                "AeTitle": AE,
                "BindAddress": "127.0.0.1",
                "Port": free_port(),
                "MaxAssociations": max(4, concurrency),
                # Every sender here is 127.0.0.1: let one host use every slot.
                "MaxAssociationsPerPeer": max(4, concurrency),
                "SpoolPath": str(root / "spool"),
            },
            "Journal": {"Path": str(root / "journal.sqlite3")},
        }
    )
    journal = Journal(config.journal.path)
    source = DicomScpSource(config)
    # Nothing behind it: each object is taken and deleted as soon as it appears.
    source.start(lambda item: (source.dispose(item), source.release(item)))
    small = data / SMALL
    per: list[float] = []

    def one(_: int) -> None:
        t0 = time.perf_counter()
        send(binary, config.dicom.port, small, nodelay=nodelay)
        per.append((time.perf_counter() - t0) * 1000)

    try:
        one(-1)  # warm-up
        per.clear()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    finally:
        source.stop()
        journal.close()
    return n / wall, pct(per, 95)


class ResultWaiter:
    """A real MQTT subscriber: when each result (by SOP Instance UID) and each FHIR report arrived."""

    def __init__(self, port: int, topic: str) -> None:
        self.arrived: dict[str, float] = {}
        #: (arrival, payload text) of every FHIR Bundle on the FHIR topic.
        self.fhir: list[tuple[float, str]] = []
        self.results: dict[str, dict] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub"
        )
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise SystemExit("benchmark subscriber could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        with self.cond:
            if msg.topic.endswith("/fhir"):
                self.fhir.append((now, msg.payload.decode()))
            elif msg.topic.endswith("/results"):
                payload = json.loads(msg.payload)
                uid = payload.get("input", {}).get("sop_instance_uid")
                self.arrived.setdefault(uid, now)
                self.results.setdefault(uid, payload)
            self.cond.notify_all()

    def wait(self, uid: str, timeout_s: float = 60.0) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: uid in self.arrived, timeout=timeout_s):
                raise SystemExit(f"no result for {uid} within {timeout_s:.0f} s")
            return self.arrived[uid]

    def wait_fhir(self, message_id: str, timeout_s: float = 60.0) -> float:
        """When the FHIR Bundle of the result ``message_id`` arrived (its ids derive from it)."""

        def found() -> float | None:
            return next((t for t, text in self.fhir if message_id in text), None)

        with self.cond:
            if not self.cond.wait_for(lambda: found() is not None, timeout=timeout_s):
                raise SystemExit(f"no FHIR report for {message_id[:16]} within {timeout_s:.0f} s")
            return found() or 0.0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Pacs:
    """A real C-STORE SCP (pynetdicom, in this process): when each instance was stored."""

    def __init__(self) -> None:
        from pynetdicom import AE as AppEntity
        from pynetdicom import StoragePresentationContexts, evt

        self.stored: dict[str, float] = {}
        self.cond = threading.Condition()
        self.port = free_port()
        ae = AppEntity(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: object) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)  # type: ignore[attr-defined]
        with self.cond:
            self.stored.setdefault(uid, time.perf_counter())
            self.cond.notify_all()
        return 0x0000

    def wait(self, uid: str, timeout_s: float = 60.0) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: uid in self.stored, timeout=timeout_s):
                raise SystemExit(f"the SR {uid} did not reach the PACS within {timeout_s:.0f} s")
            return self.stored[uid]

    def close(self) -> None:
        self.server.shutdown()


def latency(
    binary: str, data: Path, tmp: Path, broker_port: int, repeats: int, workers: int, bundle: Path | None
) -> list[tuple[str, str, float, float]]:
    """(input, what arrived, p50 ms, p95 ms) from storescu start to the MQTT result, the SR stored at
    the PACS and the FHIR report on its topic."""
    import pydicom

    port = free_port()
    pacs = Pacs()
    config = RuntimeConfig.from_mapping(
        {
            "Inbox": {"Path": str(tmp / "inbox"), "QuarantinePath": str(tmp / "q")},
            "Dicom": {
                "Enabled": True,
                "AeTitle": AE,
                "BindAddress": "127.0.0.1",
                "Port": port,
                "SpoolPath": str(tmp / "spool"),
                "Store": {"Host": "127.0.0.1", "Port": pacs.port, "AeTitle": "PACS"},
            },
            "Mqtt": {"Host": "127.0.0.1", "Port": broker_port, "ClientId": "bench-scp"},
            "Journal": {"Path": str(tmp / "state" / "journal.sqlite3")},
            "Workers": workers,
            "Model": {"BundlePath": str(bundle) if bundle else ""},
        }
    )
    service = EdgeService(config)
    service.start()
    assert service.mqtt is not None
    service.mqtt.wait_connected(10)
    waiter = ResultWaiter(broker_port, f"{config.mqtt.topic_prefix}/#")
    b = service.analyzer.bundle
    print(f"model {b.name} {b.version} ({service.analyzer.backend.name}), {workers} workers\n")
    rows = []
    try:
        for label, (rel, options) in LATENCY_INPUTS.items():
            copies = make_copies(data / rel, tmp / "staging" / Path(rel).stem, repeats + 1)
            uids = [str(pydicom.dcmread(c, stop_before_pixels=True).SOPInstanceUID) for c in copies]
            times: dict[str, list[float]] = {
                "MQTT result": [],
                "SR stored at the PACS": [],
                "FHIR report": [],
            }
            for i, (copy, uid) in enumerate(zip(copies, uids, strict=True)):
                t0 = time.perf_counter()
                send(binary, port, copy, options)
                arrived = waiter.wait(uid)
                result = waiter.results[uid]
                stored = pacs.wait(result["reports"]["sr"]["sop_instance_uid"])
                fhir = waiter.wait_fhir(result["message_id"])
                if i:  # the first is a warm-up
                    times["MQTT result"].append((arrived - t0) * 1000)
                    times["SR stored at the PACS"].append((stored - t0) * 1000)
                    times["FHIR report"].append((fhir - t0) * 1000)
            rows += [(label, what, pct(ms, 50), pct(ms, 95)) for what, ms in times.items()]
    finally:
        waiter.close()
        service.stop()
        pacs.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--associations", type=int, default=200, help="N for the rate test")
    parser.add_argument("--concurrency", default="1,4", help="senders at a time, comma-separated")
    parser.add_argument("--repeats", type=int, default=10, help="sends per latency input")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the bundled model)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"data folder {args.data} not found (pass --data)")
    logging.basicConfig(level=logging.WARNING)
    binary = storescu_binary()
    cpu = cpu_summary()
    print(
        f"CPU: {cpu['model']} ({cpu['machine']}, {os.cpu_count()} logical); INT8 features: "
        f"{', '.join(cpu['int8_features']) or 'none'}; u8 x s8 dot: {cpu['int8_dot']}\n"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        header = f"{'C-STORE SCP alone, 1 small object per association':52s} {'assoc/s':>8s} {'p95 ms':>8s}"
        print(header)
        print("-" * len(header))
        for nodelay in (False, True):
            for k in (int(c) for c in args.concurrency.split(",")):
                rate, p95 = associations_per_second(binary, args.data, tmp, args.associations, k, nodelay)
                label = (
                    f"{args.associations} assoc., {k} sender(s), {'TCP_NODELAY=1' if nodelay else 'Nagle on'}"
                )
                print(f"{label:52s} {rate:8.1f} {p95:8.1f}")
        print()
        broker, broker_port = start_broker(tmp)
        try:
            rows = latency(
                binary, args.data, tmp / "service", broker_port, args.repeats, args.workers, args.bundle
            )
        finally:
            broker.terminate()
            broker.wait(5)
        header = (
            f"{'storescu start -> ..., chest CR 1955x1841':38s} {'arrival':24s} {'p50 ms':>8s} {'p95 ms':>8s}"
        )
        print(header)
        print("-" * len(header))
        for label, what, p50, p95 in rows:
            print(f"{label:38s} {what:24s} {p50:8.1f} {p95:8.1f}")
        print(f"\n({args.repeats} sends per input after one warm-up, one at a time; np {np.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
