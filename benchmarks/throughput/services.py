"""The service under test, in this process and as a subprocess, and the broker it publishes to.

A real Mosquitto (:func:`broker_running`); a real :class:`EdgeService` in this process
(:class:`InProcessService`, PUBACKs from its drainers) and ``edge-runtime run`` as a subprocess
(:class:`ServiceProcess`, results timed at a real MQTT :class:`Subscriber`).

Apart because it is the harness every measurement drops scans into: each ``drop`` writes
``NAME.part`` files into the inbox, renames them at once and waits for every result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.bench_latency import start_broker
from benchmarks.throughput.common import REPO, BenchError


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
