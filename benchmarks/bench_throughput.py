"""The service against its own decode + inference floor: throughput, latency, backends, scale, cold start.

One run, on this machine, measures (issue #16, item 1):

(a) **throughput** per input kind (JPEG, PNG 16-bit, DICOM uncompressed, RLE,
    JPEG-LS, JPEG 2000). The *floor*: the very ``decode_file -> preprocess ->
    backend.infer_outputs`` calls of the runtime, on the bundled model with the
    service's thread count, in a pool of ``--workers`` processes over N distinct
    copies (scans/s). The *service*: N distinct copies written as ``NAME.part``
    into the inbox of a real :class:`EdgeService` and then renamed at once, with
    a real Mosquitto, until every result has its PUBACK (the drainers'
    ``on_delivered``), scans/s. The service runs twice: with the default reports
    (heat-map PNG and Secondary Capture; for DICOM also SR and FHIR) and with
    ``Reports.DicomSr/Fhir/Heatmap`` false. A second floor, *floor + reports*,
    runs the service's own analysis and report build per file in the same pool
    (in-process: no journal, decoder child or MQTT), so that the service with
    reports can be compared with the same work done bare. Both floors and both
    services alternate per round and kind (the order flips every round), so a
    busy moment of the machine hurts all four; medians over the rounds and service / floor ratios
    are printed, with the mean per-scan stage times of both sides.
(b) **single-scan latency**: one copy at a time, rename -> PUBACK (default
    service), p50/p95, next to the single-scan floor (decode + preprocess +
    infer in this process, one at a time), alternating scan by scan; with the
    service's own stage timings and what is left ("other": inbox detection,
    journal, outcome, MQTT hand-over and PUBACK).
(c) **backends**: ONNX Runtime FP32 (``--fp32``, optional) and INT8, LiteRT INT8
    (if ``ai-edge-litert`` imports), batch 1, 1 and 2 threads, p50/p95 ms,
    interleaved in blocks.
(d) **scale**: ``edge-runtime run`` as a subprocess (the real CLI, JSON logs
    at INFO to a pipe), 1000 JPEGs (``--quick``: 200) dropped at once: time to
    drain, result latency (rename -> arrival at a real MQTT subscriber) by
    position in the backlog, and the RSS of the service's process tree over
    time; then a few copies of every large kind, for the peak with big images.
(e) **cold start** of that subprocess: exec -> first log line -> "starting" ->
    retained ``online`` status, and exec -> first result for one scan already in
    the inbox (it waits ``Inbox.SettleSeconds``, as any file found at start-up
    does); peak RSS of the service plus its decoder children (sum over the
    process tree, sampled; also the sum of VmHWM and of PSS where readable).

Then every target of the issue is printed next to its measured value with
MET/MISSED. Tables go to stdout; ``--out`` gets ``bench_throughput.json``
(every number), ``bench_throughput.png`` (needs matplotlib), the service logs,
and with ``--profile`` py-spy profiles of the subprocess service (a JPEG and an
uncompressed DICOM drop, after the scale run so its numbers are not disturbed)
with a summary of where the samples fall.

Optional parts say why they were skipped: the FP32 model, LiteRT, matplotlib,
psutil (``/proc`` is read instead), py-spy. Needs ``mosquitto`` and the shared
data (``--data``, default ../shared/data); derived inputs (the 16-bit PNG and
the RLE file, both from RG1_UNCR's pixels) are made outside any timed part.

Usage (from the repository root):
    python -m benchmarks.bench_throughput --quick                 # a few minutes
    python -m benchmarks.bench_throughput [--rounds 3] [--out DIR] [--profile]
    python -m benchmarks.bench_throughput --parts throughput --kinds jpeg,uncompressed
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import logging
import multiprocessing as mp
import multiprocessing.util as mp_util
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_latency import start_broker
from edge_runtime.cpu import cpu_summary

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FP32 = REPO / "runs" / "k96" / "model.fp32.onnx"

KERMANY = "cxr/kermany_pneumonia_224/test/PNEUMONIA/person1_virus_6.jpeg"
RG1_UNCR = "dicom/pydicom_data/RG1_UNCR.dcm"
RG1_J2KR = "dicom/pydicom_data/RG1_J2KR.dcm"
RG1_JLSN = "dicom/wg04/RG1_JLSN"

PARTS = ("throughput", "latency", "backends", "scale")
TARGET_RATIO = 0.90
TARGET_P95 = 1.2
TARGET_COLD_S = 1.0
TARGET_RSS_MB = 300.0


@dataclasses.dataclass(frozen=True)
class Kind:
    key: str
    label: str
    n_quick: int  # copies per throughput measurement with --quick
    n_full: int


KINDS = (
    Kind("jpeg", "JPEG Kermany 224 px", 60, 300),
    Kind("png16", "PNG 16-bit 1955x1841", 12, 40),
    Kind("uncompressed", "DICOM uncompressed RG1_UNCR", 12, 40),
    Kind("rle", "DICOM RLE (RG1 re-encoded)", 12, 40),
    Kind("jpegls", "DICOM JPEG-LS near-lossless", 6, 24),
    Kind("j2k", "DICOM JPEG 2000 lossless", 4, 12),
)
KIND = {k.key: k for k in KINDS}
RASTER = {"jpeg", "png16"}


class BenchError(SystemExit):
    pass


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def say(text: str = "") -> None:
    print(text, flush=True)


# -- inputs ------------------------------------------------------------------------------
def prepare_sources(data: Path, work: Path, kinds: list[str]) -> dict[str, Path]:
    """One template file per kind (derived ones made here, outside any timing); skips what is missing."""
    work.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    plain = {"jpeg": KERMANY, "uncompressed": RG1_UNCR, "jpegls": RG1_JLSN, "j2k": RG1_J2KR}
    for key in kinds:
        if key in plain:
            path = data / plain[key]
            if path.is_file():
                found[key] = path
            else:
                say(f"skipped {key}: {path} not found")
            continue
        source = data / RG1_UNCR
        if not source.is_file():
            say(f"skipped {key}: {source} (its source) not found")
            continue
        try:
            found[key] = _derive(key, source, work)
        except Exception as exc:  # an encoder missing: say so, measure the rest
            say(f"skipped {key}: cannot derive it from RG1_UNCR ({type(exc).__name__}: {exc})")
    return found


def _derive(key: str, source: Path, work: Path) -> Path:
    import pydicom

    ds = pydicom.dcmread(source)
    if key == "png16":
        import cv2

        pixels = ds.pixel_array.astype(np.uint32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = pixels.max() - pixels
        shift = max(0, 16 - int(ds.BitsStored))
        out = work / "rg1_16bit.png"
        if not cv2.imwrite(str(out), (pixels << shift).astype(np.uint16)):
            raise RuntimeError("cv2.imwrite failed")
        return out
    from pydicom.uid import RLELossless

    try:
        ds.compress(RLELossless, encoding_plugin="pylibjpeg")
    except Exception:
        ds = pydicom.dcmread(source)
        ds.compress(RLELossless)  # pydicom's own (slower) encoder
    out = work / "rg1_rle.dcm"
    ds.save_as(out)
    return out


class CopyMaker:
    """Distinct copies (where identity lives: bytes after the end marker, a new SOP Instance UID)."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources
        self._serial = itertools.count()
        self._raw: dict[str, bytes] = {}
        self._datasets: dict[str, Any] = {}

    def make(self, kind: str) -> tuple[str, bytes, str]:
        """(file name, bytes, sha256) of a new copy."""
        import hashlib

        i = next(self._serial)
        src = self.sources[kind]
        if kind in RASTER:
            if kind not in self._raw:
                self._raw[kind] = src.read_bytes()
            data = self._raw[kind] + i.to_bytes(4, "big")  # after EOI / IEND: ignored by decoders
            name = f"{kind}-{i:06d}{src.suffix}"
        else:
            import pydicom
            from pydicom.uid import generate_uid

            ds = self._datasets.get(kind)
            if ds is None:
                ds = self._datasets[kind] = pydicom.dcmread(src)
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buf = io.BytesIO()
            ds.save_as(buf)
            data = buf.getvalue()
            name = f"{kind}-{i:06d}.dcm"
        return name, data, hashlib.sha256(data).hexdigest()

    def many(self, kind: str, n: int) -> list[tuple[str, bytes, str]]:
        return [self.make(kind) for _ in range(n)]


# -- the floor: the runtime's own stage functions, no service around them -----------------
_FLOOR: dict[str, Any] = {}


def _floor_init(
    bundle_path: str,
    backend_name: str,
    threads: int,
    max_pixels: int,
    warm: list[str],
    ready: Any = None,
) -> None:
    from edge_runtime.backends import create_backend
    from edge_runtime.bundle import load_bundle
    from edge_runtime.config import ReportsConfig
    from edge_runtime.decode import DecodeLimits
    from edge_runtime.pipeline import ScanAnalyzer
    from edge_runtime.reports.writer import ReportWriter

    bundle = load_bundle(bundle_path)
    backend = create_backend(backend_name, threads=threads)
    backend.load(bundle)
    limits = DecodeLimits(max_pixels=max_pixels)
    reports = Path(tempfile.mkdtemp(prefix="floor-reports-"))
    # Pool workers leave through os._exit (no atexit): multiprocessing's own finalizers do run.
    mp_util.Finalize(None, shutil.rmtree, args=(reports,), kwargs={"ignore_errors": True}, exitpriority=10)
    _FLOOR.update(
        spec=bundle.preprocessing,
        backend=backend,
        buf=np.empty((1, *bundle.preprocessing.sample_shape), dtype=np.float32),
        limits=limits,
        # The floor with reports: the service's own analysis (in this process, no decoder child)
        # and report build, with the default Reports settings, but no journal, sandbox or MQTT.
        analyzer=ScanAnalyzer(bundle, backend, limits=limits),
        writer=ReportWriter(ReportsConfig(), reports),
        reports=reports,
    )
    for path in warm:
        _floor_one(path)
        _floor_with_reports_one(path)
    if ready is not None:
        with ready.get_lock():
            ready.value += 1


def _floor_one(path: str) -> tuple[float, float, float]:
    """decode_file -> preprocess -> infer_outputs on one file: the seconds of each."""
    from edge_runtime.decode import decode_file
    from edge_runtime.preprocess import preprocess

    t0 = time.perf_counter()
    image = decode_file(Path(path), _FLOOR["limits"])
    t1 = time.perf_counter()
    preprocess(image.pixels, _FLOOR["spec"], out=_FLOOR["buf"][0])
    t2 = time.perf_counter()
    _FLOOR["backend"].infer_outputs(_FLOOR["buf"])
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def _floor_with_reports_one(path: str) -> tuple[float, float, float]:
    """The service's analysis and its reports on one file, in-process: (analyze, reports, 0) seconds."""
    from edge_runtime.reports.writer import prioritize

    t0 = time.perf_counter()
    outcome = _FLOOR["analyzer"].analyze(Path(path))
    t1 = time.perf_counter()
    result = outcome.result
    prioritize(result, None)
    _FLOOR["writer"].build(result, outcome.header, image=outcome.image, heatmap=outcome.heatmap)
    t2 = time.perf_counter()
    shutil.rmtree(_FLOOR["reports"] / result["message_id"], ignore_errors=True)
    return t1 - t0, t2 - t1, 0.0


class FloorPool:
    """``workers`` processes (spawned: no inherited ONNX Runtime threads), each with its own session."""

    def __init__(self, workers: int, init_args: tuple[Any, ...]) -> None:
        ctx = mp.get_context("spawn")
        ready = ctx.Value("i", 0)
        self.pool = ctx.Pool(workers, initializer=_floor_init, initargs=(*init_args, ready))
        deadline = time.monotonic() + 300
        while ready.value < workers:  # every worker loaded its model and decoded every kind once
            if time.monotonic() > deadline:
                raise BenchError("the floor pool did not start within 300 s")
            time.sleep(0.05)

    def run(
        self, paths: list[Path], *, reports: bool = False
    ) -> tuple[float, list[tuple[float, float, float]]]:
        one = _floor_with_reports_one if reports else _floor_one
        t0 = time.perf_counter()
        stages = list(self.pool.imap_unordered(one, [str(p) for p in paths], chunksize=1))
        return time.perf_counter() - t0, stages

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


# -- the service in this process: a real EdgeService, PUBACKs from its drainers -----------------
@dataclasses.dataclass
class DropResult:
    t0: float
    renamed: dict[str, float]  # sha256 -> perf_counter at rename
    acked: dict[str, float]  # sha256 -> perf_counter at PUBACK of the result
    results: dict[str, dict[str, Any]]

    @property
    def elapsed(self) -> float:
        return max(self.acked.values()) - self.t0

    def latencies_ms(self) -> list[float]:
        return [(self.acked[s] - self.renamed[s]) * 1000 for s in self.renamed]


class InProcessService:
    def __init__(self, root: Path, port: int, workers: int, reports: bool, label: str) -> None:
        from edge_runtime.config import RuntimeConfig
        from edge_runtime.service import EdgeService

        self.label = label
        self.config = RuntimeConfig.from_mapping(
            {
                "Inbox": {"Path": str(root / "inbox"), "QuarantinePath": str(root / "quarantine")},
                "Mqtt": {
                    "Host": "127.0.0.1",
                    "Port": port,
                    "ClientId": f"bench-{label}",
                    "TopicPrefix": f"bench/{label}",
                },
                "Journal": {"Path": str(root / "state" / "journal.sqlite3")},
                "Health": {"File": str(root / "state" / "health.json")},
                "Workers": workers,
                "Reports": {"DicomSr": reports, "Fhir": reports, "Heatmap": reports},
            }
        )
        self.service = EdgeService(self.config)
        self.results_topic = self.config.mqtt.results_topic
        self.cond = threading.Condition()
        self.acked: dict[str, float] = {}
        self.results: dict[str, dict[str, Any]] = {}
        for drainer in self.service.drainers:
            drainer.on_delivered = self._on_delivered

    def _on_delivered(self, message: Any, _latency_s: float) -> None:
        now = time.perf_counter()
        if message.topic != self.results_topic:
            return
        result = json.loads(message.payload)
        sha = result["input"]["sha256"]
        with self.cond:
            self.acked[sha] = now
            self.results[sha] = result
            self.cond.notify_all()

    def start(self) -> None:
        self.service.start()
        mqtt = self.service.mqtt
        if mqtt is None or not mqtt.wait_connected(15):
            raise BenchError(f"service {self.label}: no MQTT connection")

    def drop(self, copies: list[tuple[str, bytes, str]], timeout_s: float) -> DropResult:
        """Write ``NAME.part`` for all, rename all at once, wait for every result's PUBACK."""
        inbox = self.config.inbox.path
        for name, data, _ in copies:
            (inbox / f"{name}.part").write_bytes(data)
        renamed: dict[str, float] = {}
        t0 = time.perf_counter()
        for name, _, sha in copies:
            os.rename(inbox / f"{name}.part", inbox / name)
            renamed[sha] = time.perf_counter()
        with self.cond:
            ok = self.cond.wait_for(lambda: all(s in self.acked for s in renamed), timeout_s)
            acked = {s: self.acked[s] for s in renamed if s in self.acked}
            results = {s: self.results[s] for s in renamed if s in self.results}
        if not ok:
            quarantined = sorted(p.name for p in self.config.inbox.quarantine_path.glob("*.error.json"))
            raise BenchError(
                f"service {self.label}: {len(renamed) - len(acked)} of {len(renamed)} results without "
                f"PUBACK after {timeout_s:.0f} s; quarantined: {quarantined[:5]}; last error: "
                f"{self.service.last_error}"
            )
        self.wait_idle()
        return DropResult(t0, renamed, acked, results)

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until the outbox (FHIR, urgent rows too) is empty, so the next measurement starts clean."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.service.journal.outbox_pending():
            time.sleep(0.01)

    def stop(self) -> None:
        self.service.stop()


def route_service_logs(level: str, log_file: Path) -> None:
    """Log as ``edge-runtime run`` does (JSON, names redacted), into a file instead of stderr."""
    from edge_runtime.logs import configure_logging

    configure_logging(level, "json", redact_names=True)
    stream = log_file.open("a", encoding="utf-8", buffering=1)  # stderr is line-buffered too
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)


# -- process tree memory ----------------------------------------------------------------
try:
    import psutil
except ImportError:  # read /proc instead
    psutil = None


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            return [pid, *(c.pid for c in proc.children(recursive=True))]
        except psutil.Error:
            return []
    children = _proc_children()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemorySampler:
    """RSS (and VmHWM, PSS) of a process and all its descendants, every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        #: (perf_counter, processes, sum RSS MB, sum PSS MB or nan, sum VmHWM MB)
        self.samples: list[tuple[float, int, float, float, float]] = []
        self.peak_rss_by_pid: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        pids = process_tree(self.pid)
        rss = hwm = pss = 0.0
        pss_ok = True
        for p in pids:
            kb = _status_kb(p)
            rss += kb.get("VmRSS", 0) / 1024
            hwm += kb.get("VmHWM", 0) / 1024
            self.peak_rss_by_pid[p] = max(self.peak_rss_by_pid.get(p, 0.0), kb.get("VmRSS", 0) / 1024)
            value = _pss_kb(p)
            pss_ok = pss_ok and value is not None
            pss += (value or 0) / 1024
        if pids:
            self.samples.append((time.perf_counter(), len(pids), rss, pss if pss_ok else float("nan"), hwm))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> dict[str, float]:
        rows = [s for s in self.samples if since <= s[0] <= until]
        if not rows:
            return {}
        pss = [s[3] for s in rows if not np.isnan(s[3])]
        return {
            "rss_mb": max(s[2] for s in rows),
            "pss_mb": max(pss) if pss else float("nan"),
            "hwm_sum_mb": max(s[4] for s in rows),
            "processes": max(s[1] for s in rows),
        }


# -- the service as a subprocess (edge-runtime run) ----------------------------------------
class Subscriber:
    """A real MQTT subscriber: arrival time of each result (by sha256) and of the status messages."""

    def __init__(self, port: int, prefix: str) -> None:
        import paho.mqtt.client as mqtt

        self.cond = threading.Condition()
        self.arrived: dict[str, float] = {}
        self.status: list[tuple[float, str]] = []
        self.results_topic = f"{prefix}/results"
        self.status_topic = f"{prefix}/status"
        ready = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}"
        )
        self.client.on_connect = lambda c, *a: c.subscribe([(self.results_topic, 1), (self.status_topic, 1)])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise BenchError("MQTT subscriber could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.perf_counter()
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        with self.cond:
            if msg.topic == self.results_topic:
                self.arrived.setdefault(payload["input"]["sha256"], now)
            elif msg.topic == self.status_topic:
                self.status.append((now, str(payload.get("state"))))
            self.cond.notify_all()

    def first_online(self) -> float | None:
        return next((t for t, state in self.status if state == "online"), None)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class ServiceProcess:
    """``python -m edge_runtime.cli run --config FILE``: real CLI, real logging (stderr, JSON, INFO)."""

    def __init__(self, root: Path, port: int, workers: int, out: Path) -> None:
        self.root = root
        self.prefix = f"bench/cli-{os.getpid()}"
        self.inbox = root / "inbox"
        self.config_file = root / "config.json"
        self.config_file.write_text(
            json.dumps(
                {
                    "Inbox": {"Path": str(self.inbox), "QuarantinePath": str(root / "quarantine")},
                    "Mqtt": {
                        "Host": "127.0.0.1",
                        "Port": port,
                        "ClientId": "bench-cli",
                        "TopicPrefix": self.prefix,
                    },
                    "Journal": {"Path": str(root / "state" / "journal.sqlite3")},
                    "Health": {"File": str(root / "state" / "health.json")},
                    "Workers": workers,
                    "Logging": {"Level": "INFO", "Format": "json"},
                }
            )
        )
        self.port = port
        self.log_path = out / "service-cli.log"
        self.log_lines: list[tuple[float, str]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_exec = 0.0

    def start(self) -> Subscriber:
        subscriber = Subscriber(self.port, self.prefix)
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.t_exec = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(self.config_file)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._read_log, name="cli-log", daemon=True).start()
        return subscriber

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.log_path.open("w", encoding="utf-8") as sink:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                self.log_lines.append((time.perf_counter(), line))
                sink.write(line)

    def first_log(self, needle: str = "") -> float | None:
        return next((t for t, line in list(self.log_lines) if needle in line), None)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def drop(
        self, subscriber: Subscriber, copies: list[tuple[str, bytes, str]], timeout_s: float
    ) -> DropResult:
        for name, data, _ in copies:
            (self.inbox / f"{name}.part").write_bytes(data)
        renamed: dict[str, float] = {}
        t0 = time.perf_counter()
        for name, _, sha in copies:
            os.rename(self.inbox / f"{name}.part", self.inbox / name)
            renamed[sha] = time.perf_counter()
        with subscriber.cond:
            ok = subscriber.cond.wait_for(lambda: all(s in subscriber.arrived for s in renamed), timeout_s)
            arrived = {s: subscriber.arrived[s] for s in renamed if s in subscriber.arrived}
        if not ok:
            raise BenchError(
                f"edge-runtime run: {len(renamed) - len(arrived)} of {len(renamed)} results missing after "
                f"{timeout_s:.0f} s (log: {self.log_path})"
            )
        return DropResult(t0, renamed, arrived, {})


# -- py-spy ------------------------------------------------------------------------------
def start_pyspy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    binary = shutil.which("py-spy")
    if binary is None:
        return None
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            "100",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_pyspy(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return next((line for line in reversed(lines) if "Samples" in line), lines[-1] if lines else "")


def summarise_profile(path: Path, top: int = 18) -> dict[str, Any]:
    """Self and inclusive samples per function (py-spy 'raw' collapsed stacks), and per thread role."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _split_frames(stack)
        # py-spy --subprocesses: one 'process PID:"cmd"' frame per generation ahead of the code
        procs = list(itertools.takewhile(lambda f: f.startswith("process "), frames))
        code = [f for f in frames[len(procs) :] if not _boring(f)]
        who = "service" if len(procs) <= 1 else "decoder child"
        total += count
        threads[f"{who}: {_thread_role(code) or 'other'}"] += count
        if code:
            self_c[_short(code[-1])] += count
            for frame in {_short(f) for f in code}:
                incl[frame] += count
    return {
        "samples": total,
        "self": self_c.most_common(top),
        "inclusive": incl.most_common(top),
        "threads": threads.most_common(12),
    }


def _split_frames(stack: str) -> list[str]:
    """Split on ';' except inside a quoted command line (which may contain ';')."""
    frames: list[str] = []
    for token in stack.split(";"):
        if frames and frames[-1].count('"') % 2:
            frames[-1] += ";" + token
        else:
            frames.append(token)
    return frames


_BORING = ("threading.py", "multiprocessing/", "runpy.py", "(<string>", "contextlib.py")


def _boring(frame: str) -> bool:
    """Frames every stack has (thread and process bootstrap): left out of the summary."""
    return any(marker in frame for marker in _BORING) or frame.startswith(" main(")


def _short(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py)'."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    parts = Path(file).parts
    return f"{name} ({'/'.join(parts[-2:])})"


def _thread_role(code: list[str]) -> str:
    """Which service thread a stack belongs to, from its frames."""
    text = ";".join(code[:8])
    for marker, role in (
        ("_work (", "worker"),
        ("_loop (edge_runtime/sinks", "drainer"),
        ("drainer.py", "drainer"),
        ("inbox.py", "inbox"),
        ("_child_main", "decoder"),
        ("decode_file", "decoder"),
        ("health.py", "heartbeat"),
        ("paho", "mqtt network"),
        ("watchdog", "inotify"),
    ):
        if marker in text:
            return role
    return ""


# -- measurements ------------------------------------------------------------------------
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


def n_for(args: argparse.Namespace, key: str) -> int:
    base = KIND[key].n_quick if args.quick else KIND[key].n_full
    return max(2, round(base * args.scale_n))


def print_throughput(out: dict[str, Any], workers: int) -> None:
    say(
        f"\nthroughput ({workers} workers; floor = {workers}-process pool of decode_file -> preprocess -> "
        "infer; service = N copies renamed into the inbox at once, until every PUBACK; medians)"
    )
    head = (
        f"{'input':30s} {'N':>4s} {'floor/s':>8s} {'service/s':>9s} {'ratio':>6s} "
        f"{'no-reports/s':>12s} {'ratio':>6s} {'floor+reports/s':>15s} {'service/it':>10s}"
    )
    say(head)
    say("-" * len(head))
    for key, row in out.items():
        say(
            f"{KIND[key].label:30s} {row['n']:4d} {row['floor_median']:8.1f} {row['service_median']:9.1f} "
            f"{row['ratio']:6.2f} {row['service_no_reports_median']:12.1f} {row['ratio_no_reports']:6.2f} "
            f"{row['floor_reports_median']:15.1f} {row['ratio_vs_floor_reports']:10.2f}"
        )
    say(
        "(floor+reports: the same pool running the service's own analysis and report build per file, "
        "in-process, with no journal, decoder child or MQTT; service/it = service / floor+reports)"
    )
    say("\nper-scan stage means under load, ms (floor: in the pool; service: its own timings_ms)")
    head = (
        f"{'input':30s} {'side':12s} {'hash':>6s} {'decode':>7s} {'prep':>6s} {'infer':>6s} "
        f"{'reports':>7s} {'queue p50':>9s}"
    )
    say(head)
    say("-" * len(head))
    for key, row in out.items():
        fl = np.asarray(row["floor_stages_ms"])
        say(
            f"{KIND[key].label:30s} {'floor':12s} {'':>6s} {fl[:, 0].mean():7.1f} {fl[:, 1].mean():6.1f} "
            f"{fl[:, 2].mean():6.1f} {'':>7s} {'':>9s}"
        )
        for which, label in (("service", "service"), ("service_no_reports", "no-reports")):
            t = row["service_stages_ms"][which]

            def mean(k: str, t: list[dict[str, float]] = t) -> float:
                return float(np.mean([x.get(k, 0.0) for x in t]))

            say(
                f"{'':30s} {label:12s} {mean('hash'):6.1f} {mean('decode'):7.1f} {mean('preprocess'):6.1f} "
                f"{mean('infer'):6.1f} {mean('reports'):7.1f} "
                f"{pct([x.get('queue', 0.0) for x in t], 50):9.1f}"
            )


_STAGES = ("queue", "hash", "decode", "preprocess", "infer", "reports")


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
                    t = sum(_floor_one(str(path))) * 1000
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
            other = [
                e2e - sum(s.get(k, 0.0) for k in _STAGES) for e2e, s in zip(ms[which], rows, strict=True)
            ]
            row[f"{which}_stage_p50_ms"] = {k: pct([s.get(k, 0.0) for s in rows], 50) for k in _STAGES} | {
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


def print_latency(out: dict[str, Any]) -> None:
    say(
        "\nsingle-scan latency, ms (service: rename -> PUBACK, one scan at a time; floor: decode + "
        "preprocess + infer in-process)"
    )
    head = (
        f"{'input':30s} {'floor p50':>9s} {'p95':>7s} {'service p50':>11s} {'p95':>7s} {'ratio':>5s} "
        f"{'no-reports p50':>14s} {'p95':>7s} {'ratio':>5s}"
    )
    say(head)
    say("-" * len(head))
    for key, row in out.items():
        say(
            f"{KIND[key].label:30s} {row['floor_p50']:9.1f} {row['floor_p95']:7.1f} "
            f"{row['service_p50']:11.1f} {row['service_p95']:7.1f} {row['ratio_p95']:5.2f} "
            f"{row['service_no_reports_p50']:14.1f} {row['service_no_reports_p95']:7.1f} "
            f"{row['ratio_p95_no_reports']:5.2f}"
        )
    say("(ratio = service p95 / floor p95)")
    say(
        "\nwhere a single scan's time goes, p50 ms (the service's own timings_ms; other = rename -> PUBACK "
        "minus those: inbox detection, journal, outcome, MQTT hand-over and PUBACK)"
    )
    head = f"{'input':30s} {'side':11s} " + " ".join(f"{k[:7]:>7s}" for k in (*_STAGES, "other"))
    say(head)
    say("-" * len(head))
    for key, row in out.items():
        for which, label in (("service", "service"), ("service_no_reports", "no-reports")):
            s = row[f"{which}_stage_p50_ms"]
            name = KIND[key].label if which == "service" else ""
            say(f"{name:30s} {label:11s} " + " ".join(f"{s[k]:7.1f}" for k in (*_STAGES, "other")))


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


def print_backends(out: dict[str, Any], cpu: dict[str, Any]) -> None:
    say(
        f"\nbackends, batch 1 (CPU {cpu['model']}; "
        f"INT8 features: {', '.join(cpu['int8_features']) or 'none'}; u8 x s8 dot: {cpu['int8_dot']})"
    )
    head = f"{'backend':14s} {'threads':>7s} {'runs':>5s} {'p50 ms':>8s} {'p95 ms':>8s}"
    say(head)
    say("-" * len(head))
    for row in out["rows"].values():
        say(
            f"{row['backend']:14s} {row['threads']:7d} {row['runs']:5d} "
            f"{row['p50_ms']:8.2f} {row['p95_ms']:8.2f}"
        )
    for label, why in out["skipped"].items():
        say(f"{label:14s} skipped: {why}")


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
    result["memory_method"] = "psutil + /proc" if psutil is not None else "/proc (psutil not installed)"
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


def profile_drops(
    args: argparse.Namespace,
    service: ServiceProcess,
    subscriber: Subscriber,
    maker: CopyMaker,
    kinds: list[str],
    n: int,
    out_dir: Path,
) -> dict[str, Any]:
    assert service.proc is not None
    if shutil.which("py-spy") is None:
        say("  skipped the profile: py-spy not found (pip install py-spy)")
        return {"skipped": "py-spy not found"}
    profiles: dict[str, Any] = {}
    plan = [("jpeg", n)]
    if "uncompressed" in kinds:
        plan.append(("uncompressed", max(8, n_for(args, "uncompressed"))))
    for key, count in plan:
        path = out_dir / f"profile-{key}.txt"
        spy = start_pyspy(service.proc.pid, path)
        assert spy is not None
        time.sleep(1.0)  # py-spy attached
        drop = service.drop(subscriber, maker.many(key, count), timeout_s=120 + 5 * count)
        note = stop_pyspy(spy)
        if not path.is_file():
            say(f"  profile of {key} failed: {note}")
            profiles[key] = {"error": note}
            continue
        summary = summarise_profile(path)
        summary.update(
            {"file": str(path), "n": count, "scans_per_s_under_py_spy": count / drop.elapsed, "py_spy": note}
        )
        profiles[key] = summary
    return profiles


def print_scale(out: dict[str, Any]) -> None:
    cold = out["cold_start"]
    say("\ncold start of edge-runtime run (exec of python -m edge_runtime.cli run; page cache warm), s")
    say(
        f"  python + imports only (exec -> exit of 'import edge_runtime.cli, edge_runtime.service') "
        f"{cold['imports_only_s']:.2f}\n"
        f"  first log line (model loaded and conformance-checked) {cold['first_log_s']:.2f}   'starting' "
        f"{cold['starting_log_s']:.2f}   online status {cold['online_s']:.2f}   first result "
        f"{cold['first_result_s']:.2f} (pre-dropped scan; includes Inbox.SettleSeconds "
        f"{cold['settle_s']:.1f})"
    )
    sc = out["scale"]
    say(f"\nscale: {out['n']} JPEGs renamed into the inbox at once (results timed at a real MQTT subscriber)")
    say(
        f"  drained in {sc['drain_s']:.2f} s = {sc['scans_per_s']:.1f} scans/s; latency p50 "
        f"{sc['latency_ms']['p50']:.0f} ms, p95 {sc['latency_ms']['p95']:.0f} ms, "
        f"max {sc['latency_ms']['max']:.0f} ms"
    )
    say(f"  {'position (decile)':18s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
    for d in sc["deciles"]:
        say(f"  {d['decile']:18d} {d['p50_ms']:8.0f} {d['p95_ms']:8.0f} {d['max_ms']:8.0f}")
    m = sc["memory_peak"]
    say(
        f"  memory during the drop (service + decoder children, {m.get('processes', 0)} processes): peak "
        f"sum RSS {m.get('rss_mb', float('nan')):.0f} MB, sum PSS {m.get('pss_mb', float('nan')):.0f} MB"
    )
    if "large_kinds_memory_peak" in out:
        m = out["large_kinds_memory_peak"]
        say(
            f"  with large images ({', '.join(out['large_kinds'])}): peak sum RSS {m['rss_mb']:.0f} MB, "
            f"sum PSS {m['pss_mb']:.0f} MB"
        )
    m = out["memory_peak_overall"]
    say(
        f"  whole life: peak sum RSS {m['rss_mb']:.0f} MB, sum PSS {m['pss_mb']:.0f} MB, sum of VmHWM "
        f"{m['hwm_sum_mb']:.0f} MB ({out['memory_method']})"
    )
    for key, prof in (out.get("profiles") or {}).items():
        if not isinstance(prof, dict) or "self" not in prof:
            continue
        say(
            f"\nprofile of the service during a {prof['n']}-scan {key} drop "
            f"(py-spy, {prof['samples']} samples at 100 Hz, all processes; "
            f"{prof['scans_per_s_under_py_spy']:.1f} scans/s while sampled): "
            f"{prof['file']}"
        )
        say("  samples by thread: " + ", ".join(f"{t} {c}" for t, c in prof["threads"]))
        say(f"  {'self samples':>12s}  function")
        for name, count in prof["self"][:14]:
            say(f"  {count:12d}  {name}")
        say(f"  {'inclusive':>12s}  function")
        for name, count in prof["inclusive"][:18]:
            say(f"  {count:12d}  {name}")


def print_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def check(text: str, value: float, limit: float, higher_is_better: bool, shown: str) -> None:
        ok = value >= limit if higher_is_better else value <= limit
        checks.append({"target": text, "value": value, "limit": limit, "met": bool(ok)})
        say(f"  {'MET   ' if ok else 'MISSED'}  {text:58s} {shown}")

    say("\ntargets (issue #16)")
    for key, row in (results.get("throughput") or {}).items():
        check(
            f"throughput {key}: service / floor >= {TARGET_RATIO:.2f}",
            row["ratio"],
            TARGET_RATIO,
            True,
            f"{row['ratio']:.2f} (reports off: {row['ratio_no_reports']:.2f}; "
            f"against the floor with reports: {row['ratio_vs_floor_reports']:.2f})",
        )
    for key, row in (results.get("latency") or {}).items():
        check(
            f"single scan {key}: p95 <= {TARGET_P95} x floor p95",
            row["ratio_p95"],
            TARGET_P95,
            False,
            f"{row['ratio_p95']:.2f} x ({row['service_p95']:.1f} vs {row['floor_p95']:.1f} ms; "
            f"reports off {row['ratio_p95_no_reports']:.2f} x)",
        )
    scale = results.get("scale")
    if scale:
        online = scale["cold_start"]["online_s"]
        check(
            f"cold start: exec -> online <= {TARGET_COLD_S:.0f} s",
            online,
            TARGET_COLD_S,
            False,
            f"{online:.2f} s (first result {scale['cold_start']['first_result_s']:.2f} s)",
        )
        peak = scale["memory_peak_overall"]["rss_mb"]
        check(
            f"peak RSS service + decoder children <= {TARGET_RSS_MB:.0f} MB",
            peak,
            TARGET_RSS_MB,
            False,
            f"{peak:.0f} MB sum RSS (PSS {scale['memory_peak_overall']['pss_mb']:.0f} MB)",
        )
    return checks


# -- plot --------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install matplotlib)"
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    ax = axes[0][0]
    thr = results.get("throughput") or {}
    if thr:
        keys = list(thr)
        xs = np.arange(len(keys))
        for i, (field, label) in enumerate(
            (
                ("floor_median", "floor"),
                ("floor_reports_median", "floor + reports"),
                ("service_median", "service"),
                ("service_no_reports_median", "no reports"),
            )
        ):
            ax.bar(xs + (i - 1.5) * 0.2, [thr[k][field] for k in keys], 0.2, label=label)
        for x, k in zip(xs, keys, strict=True):
            top = max(thr[k]["floor_median"], thr[k]["service_median"], thr[k]["service_no_reports_median"])
            ax.text(x, top * 1.05, f"{thr[k]['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, keys, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("scans/s (log)")
        ax.set_title("(a) throughput; label: service / floor", fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[0][1]
    lat = results.get("latency") or {}
    if lat:
        keys = list(lat)
        xs = np.arange(len(keys))
        for i, (field, label) in enumerate(
            (
                ("floor_p50", "floor p50"),
                ("floor_p95", "floor p95"),
                ("service_p50", "service p50"),
                ("service_p95", "service p95"),
            )
        ):
            ax.bar(xs + (i - 1.5) * 0.2, [lat[k][field] for k in keys], 0.2, label=label)
        ax.set_xticks(xs, keys, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title("(b) single-scan latency", fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[0][2]
    be = (results.get("backends") or {}).get("rows") or {}
    if be:
        keys = list(be)
        xs = np.arange(len(keys))
        ax.bar(xs - 0.2, [be[k]["p50_ms"] for k in keys], 0.4, label="p50")
        ax.bar(xs + 0.2, [be[k]["p95_ms"] for k in keys], 0.4, label="p95")
        ax.set_xticks(xs, keys, rotation=20, fontsize=8)
        ax.set_ylabel("ms per inference, batch 1")
        ax.set_title("(c) backends", fontsize=10)
        ax.legend(fontsize=8)
    scale = results.get("scale")
    if scale:
        sc = scale["scale"]
        ax = axes[1][0]
        ax.plot(np.arange(1, len(sc["latency_by_position_ms"]) + 1), sc["latency_by_position_ms"], ".", ms=3)
        ax.set_xlabel("position in the backlog (rename order)")
        ax.set_ylabel("rename -> result at subscriber, ms")
        ax.set_title(f"(d) {scale['n']} JPEGs at once: drained in {sc['drain_s']:.1f} s", fontsize=10)
        ax = axes[1][1]
        tl = sc["timeline"]
        ax.plot([p["t_s"] for p in tl], [p["rss_mb"] for p in tl], label="sum RSS")
        ax.plot([p["t_s"] for p in tl], [p["pss_mb"] for p in tl], label="sum PSS")
        ax.axhline(TARGET_RSS_MB, color="grey", ls="--", lw=1, label="target")
        ax.set_xlabel("s since the first rename")
        ax.set_ylabel("MB (service + decoder children)")
        twin = ax.twinx()
        twin.plot([p["t_s"] for p in tl], [p["backlog"] for p in tl], color="tab:red", lw=1, label="backlog")
        twin.set_ylabel("scans without a result", color="tab:red")
        ax.legend(fontsize=8, loc="center right")
        ax.set_title("(d) memory and backlog over time", fontsize=10)
        ax = axes[1][2]
        cold = scale["cold_start"]
        names = ["imports only", "first log line", "'starting'", "online", "first result"]
        values = [
            cold["imports_only_s"],
            cold["first_log_s"],
            cold["starting_log_s"],
            cold["online_s"],
            cold["first_result_s"],
        ]
        ax.barh(names, values)
        ax.axvline(TARGET_COLD_S, color="grey", ls="--", lw=1)
        ax.set_xlabel("s since exec")
        ax.set_title("(e) cold start (first result waits Inbox.SettleSeconds)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


# -- main --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small N everywhere (a few minutes)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-throughput"), help="folder for JSON, PNG, logs"
    )
    parser.add_argument("--workers", type=int, default=2, help="service workers = floor pool processes")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 2, --quick 2)")
    parser.add_argument(
        "--scale-n", type=float, default=1.0, help="multiply every throughput N by this (e.g. 0.5, 3)"
    )
    parser.add_argument("--latency-repeats", type=int, default=None, help="single scans per input (8 / 30)")
    parser.add_argument("--backend-runs", type=int, default=None, help="inferences per backend (100 / 500)")
    parser.add_argument(
        "--scale", type=int, default=None, help="JPEGs dropped at once (default 1000, --quick 200)"
    )
    parser.add_argument("--fp32", type=Path, default=DEFAULT_FP32, help="FP32 ONNX model (optional)")
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the bundled one)")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (scale = d + e)",
    )
    parser.add_argument(
        "--kinds", default=",".join(k.key for k in KINDS), help="comma-separated subset of the input kinds"
    )
    parser.add_argument(
        "--log-level", default="INFO", help="log level of the in-process services (the shipped default: INFO)"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the subprocess service (after d)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or 2
    args.latency_repeats = args.latency_repeats or (8 if args.quick else 30)
    args.backend_runs = args.backend_runs or (100 if args.quick else 500)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for p in args.parts:
        if p not in PARTS:
            parser.error(f"unknown part {p!r} (choose from {', '.join(PARTS)})")
    for k in args.kinds:
        if k not in KIND:
            parser.error(f"unknown kind {k!r} (choose from {', '.join(KIND)})")
    return args


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


@contextlib.contextmanager
def broker_running(work: Path) -> Iterator[int]:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        raise BenchError("mosquitto not found (apt-get install mosquitto)")
    proc, port = start_broker(work)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
        f"backend {defaults.model.backend}, psutil {'yes' if psutil is not None else 'no (/proc)'}"
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
                _floor_init(*init)  # the single-scan floor, in this process
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


if __name__ == "__main__":
    sys.exit(main())
