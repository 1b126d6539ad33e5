"""Broker outage longer than the keepalive: nothing is lost, the status says what happened."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import TEST_TRUSTED_KEYS, Broker, Subscriber, published_name

from edge_runtime.config import RuntimeConfig
from edge_runtime.service import EdgeService

pytestmark = pytest.mark.slow


def test_mosquitto_stopped_mid_run_and_restarted(
    shared_data: Path, tiny_bundle: Path, tmp_path: Path, mosquitto
):
    broker = Broker(tmp_path)
    broker.start()
    config = RuntimeConfig.from_mapping(
        {
            "Inbox": {
                "Path": str(tmp_path / "inbox"),
                "QuarantinePath": str(tmp_path / "q"),
                "SettleSeconds": 0.2,
                "RescanIntervalSeconds": 0.5,
            },
            "Model": {"BundlePath": str(tiny_bundle), "TrustedKeys": TEST_TRUSTED_KEYS},
            "Mqtt": {
                "Host": broker.host,
                "Port": broker.port,
                "ClientId": "outage",
                "KeepaliveSeconds": 5,
                "TopicPrefix": "outage",
            },
            "Journal": {"Path": str(tmp_path / "journal.sqlite3")},
            "Health": {"HeartbeatSeconds": 1, "File": str(tmp_path / "health.json")},
        }
    )
    sources = sorted((shared_data / "cxr/kermany_pneumonia_224/test/PNEUMONIA").glob("*.jpeg"))
    first, during, after = sources[:20], sources[20:60], sources[60:70]
    service = EdgeService(config)
    service.start()
    sub = Subscriber(broker, "outage/#")
    try:
        assert service.mqtt.wait_connected(10)
        inbox = config.inbox.path
        for src in first:
            (inbox / src.name).write_bytes(src.read_bytes())
        sub.wait_for(lambda ps: len({p["message_id"] for p in ps if "message_id" in p}) >= 20)
        sub.close()
        broker.stop()  # outage longer than the 5 s keepalive
        for src in during:
            (inbox / src.name).write_bytes(src.read_bytes())
        time.sleep(8)
        assert not service.mqtt.connected
        health = service.health.snapshot()
        assert health["state"] == "degraded" and "not reachable" in health["reason"]
        assert health["counters"]["outbox_pending"] >= 30  # processed, kept for later
        broker.start()
        sub = Subscriber(broker, "outage/#")
        for src in after:
            (inbox / src.name).write_bytes(src.read_bytes())
        seen = sub.wait_for(
            lambda ps: len({p["message_id"] for p in ps if "message_id" in p}) >= len(during) + len(after),
            timeout_s=60,
        )
        names = {p["input"]["file_name"] for p in seen if p.get("message_type") == "result"}
        assert names >= {published_name(s, config=config) for s in during + after}
        statuses = [p for p in seen if p.get("message_type") == "status"]
        assert any("reconnected after" in (p.get("reason") or "") for p in statuses)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and service.journal.counts()["outbox_pending"]:
            time.sleep(0.1)
        assert service.journal.counts()["outbox_pending"] == 0
        assert service.journal.counts()["done"] == len(sources[:70])
    finally:
        sub.close()
        service.stop()
        broker.stop()
