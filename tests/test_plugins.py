"""The plugin seams: a new sink or backend is one module plus one registry line.

The sink here is a real one (it writes each result to a folder, as a spool
for another system would), registered the way a new module would be; the
service runs with a real Mosquitto. Its first hand-overs fail (the folder
does not exist yet): the one drainer retries, and the result arrives once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import drop
from helpers import service_config as make_config

from edge_runtime import sinks
from edge_runtime.backends import register_backend
from edge_runtime.config import RuntimeConfig
from edge_runtime.errors import ConfigError, PublishError
from edge_runtime.journal import Delivery, OutboxMessage
from edge_runtime.results import ScanResult
from edge_runtime.service import EdgeService
from edge_runtime.sinks import BoxState

SPOOL_ENV: dict[str, Path] = {}


class FolderSink:
    """Writes each result to ``<folder>/<message_id>.json``; fails while the folder is missing."""

    name = "folder"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.failures = 0

    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        return Delivery(self.name, str(self.folder), result.payload, 1)

    def start(self, acknowledge: Any) -> None:
        pass

    def ready(self) -> bool:
        return True

    def send(self, message: OutboxMessage) -> None:
        target = Path(message.topic) / f"{message.message_id}.json"
        try:
            target.write_text(message.payload, encoding="utf-8")
        except OSError as exc:
            self.failures += 1
            raise PublishError(f"cannot write {target}: {exc.strerror}") from exc

    def stop(self, timeout_s: float) -> None:
        pass


def folder_sink_from_config(config: RuntimeConfig, ipc: Any, state: BoxState) -> FolderSink:
    return FolderSink(SPOOL_ENV["folder"])


@pytest.fixture()
def folder_sink(monkeypatch, tmp_path: Path) -> Path:
    folder = tmp_path / "spool"
    SPOOL_ENV["folder"] = folder
    # The one registry line a new sink module adds:
    monkeypatch.setitem(sinks.SINKS, "folder", "test_plugins:folder_sink_from_config")
    return folder


def test_a_registered_sink_gets_every_result_once_after_retries(
    folder_sink: Path, shared_data, tiny_bundle, mosquitto, subscriber_factory, tmp_path
):
    config = make_config(tmp_path, mosquitto, tiny_bundle)
    service = EdgeService(config)
    (plugin,) = [s for s in service.sinks if s.name == "folder"]
    sub = subscriber_factory(config.mqtt.results_topic)
    service.start()
    try:
        drop(
            shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg",
            config.inbox.path,
            "a.jpeg",
        )
        (mqtt_result,) = sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            plugin.failures < 2 or service.journal.counts()["outbox_pending"] != 1
        ):
            time.sleep(0.05)
        assert plugin.failures >= 2  # retried with back-off while its folder was missing
        assert service.journal.counts()["outbox_pending"] == 1  # kept, not dropped
        folder_sink.mkdir()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and service.journal.counts()["outbox_pending"]:
            time.sleep(0.05)
        written = list(folder_sink.glob("*.json"))
        assert [p.stem for p in written] == [mqtt_result["message_id"]]
        assert json.loads(written[0].read_text())["decision"] == mqtt_result["decision"]
    finally:
        service.stop()


def test_model_backend_accepts_a_registered_backend_and_names_the_choices(monkeypatch):
    from edge_runtime import backends

    with pytest.raises(ConfigError, match=r"unknown backend 'tpu'; available: litert, onnxruntime"):
        RuntimeConfig.from_mapping({"Model": {"Backend": "tpu"}})
    monkeypatch.setitem(backends._REGISTRY, "tpu", "edge_runtime.backends.onnx:OnnxRuntimeBackend")
    assert RuntimeConfig.from_mapping({"Model": {"Backend": "tpu"}}).model.backend == "tpu"
    register_backend("tpu2", "edge_runtime.backends.onnx:OnnxRuntimeBackend")
    try:
        assert RuntimeConfig.from_mapping({"Model": {"Backend": "tpu2"}}).model.backend == "tpu2"
    finally:
        backends._REGISTRY.pop("tpu2")
