"""Per-stage and end-to-end latency of the running service, with a real broker.

For each input kind (a Kermany JPEG, the SIIM chest DICOM, the 1955x1841
15-bit ``RG1_UNCR.dcm``) the script drops N distinct copies into the inbox
one at a time (``NAME.part`` then rename, as storescp does) and reports, from
the result messages and the publisher's PUBACK callback:

* decode, preprocess, infer: the stage timings the runtime itself measured;
* publish: outbox hand-over to PUBACK;
* end to end: rename in the inbox to PUBACK received.

Copies differ only where identity lives (bytes after the JPEG end marker, a
new SOP Instance UID), so nothing is skipped as a duplicate. Files are
prepared outside the timed loop. Starts its own Mosquitto on a free port.

Usage (from the repository root): python -m benchmarks.bench_latency [--repeats 20] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edge_runtime.config import RuntimeConfig
from edge_runtime.service import EdgeService

REPO = Path(__file__).resolve().parents[1]

SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
INPUTS = {
    "jpeg (Kermany 224 px)": "cxr/kermany_pneumonia_224/test/PNEUMONIA/person1_virus_6.jpeg",
    "dicom SIIM (JPEG baseline 1024 px)": SIIM,
    "dicom RG1_UNCR (15-bit 1955x1841)": "dicom/pydicom_data/RG1_UNCR.dcm",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def make_copies(src: Path, out_dir: Path, n: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    if src.suffix.lower() in (".jpeg", ".jpg", ".png"):
        data = src.read_bytes()
        for i in range(n):
            path = out_dir / f"{src.stem}-{i}{src.suffix}"
            path.write_bytes(data + i.to_bytes(4, "big"))  # after EOI: ignored by decoders
            copies.append(path)
    else:
        import pydicom
        from pydicom.uid import generate_uid

        ds = pydicom.dcmread(src)
        for i in range(n):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = out_dir / f"{src.stem}-{i}.dcm"
            ds.save_as(path)
            copies.append(path)
    return copies


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the bundled model)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"data folder {args.data} not found (pass --data)")
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker, port = start_broker(tmp)
        config = RuntimeConfig.from_mapping(
            {
                "Inbox": {
                    "Path": str(tmp / "inbox"),
                    "QuarantinePath": str(tmp / "q"),
                    "SettleSeconds": 1.0,
                    "RescanIntervalSeconds": 5.0,
                },
                "Mqtt": {"Host": "127.0.0.1", "Port": port, "ClientId": "bench"},
                "Journal": {"Path": str(tmp / "journal.sqlite3")},
                "Workers": args.workers,
                "Model": {"BundlePath": str(args.bundle) if args.bundle else ""},
            }
        )
        service = EdgeService(config)
        acked: dict[str, float] = {}
        publish_ms: dict[str, float] = {}
        done = threading.Condition()

        def on_delivered(message, latency_s: float) -> None:
            import json

            name = json.loads(message.payload)["input"]["file_name"]
            with done:
                acked[name] = time.perf_counter()
                publish_ms[name] = latency_s * 1000
                done.notify_all()

        for drainer in service.drainers:
            drainer.on_delivered = on_delivered
        service.start()
        assert service.mqtt is not None
        service.mqtt.wait_connected(10)
        bundle = service.analyzer.bundle
        print(
            f"model {bundle.name} {bundle.version} ({service.analyzer.backend.name}, "
            f"{service.analyzer.model_info['quantization']}), {args.workers} workers, "
            f"{args.repeats} drops per input, sequential (no queueing)\n"
        )
        header = f"{'input':38s} {'stage':11s} {'p50 ms':>8s} {'p95 ms':>8s}"
        print(header)
        print("-" * len(header))
        try:
            for label, rel in INPUTS.items():
                copies = make_copies(
                    args.data / rel, tmp / "staging" / rel.replace("/", "_"), args.repeats + 1
                )
                stages: dict[str, list[float]] = {
                    k: [] for k in ("decode", "preprocess", "infer", "publish", "end-to-end")
                }
                for i, copy in enumerate(copies):
                    part = config.inbox.path / (copy.name + ".part")
                    shutil.copyfile(copy, part)
                    t0 = time.perf_counter()
                    part.rename(config.inbox.path / copy.name)
                    with done:
                        if not done.wait_for(lambda c=copy: c.name in acked, timeout=30):
                            raise SystemExit(f"no PUBACK for {copy.name}")
                    if i == 0:
                        continue  # warm-up
                    stages["end-to-end"].append((acked[copy.name] - t0) * 1000)
                    stages["publish"].append(publish_ms[copy.name])
                    result = service.journal.result_of(_sha256(copy))
                    assert result is not None
                    for key in ("decode", "preprocess", "infer"):
                        stages[key].append(result["timings_ms"][key])
                for stage, values in stages.items():
                    print(f"{label:38s} {stage:11s} {pct(values, 50):8.1f} {pct(values, 95):8.1f}")
                print()
        finally:
            service.stop()
            broker.terminate()
            broker.wait(5)
    return 0


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
