"""The service as an admin runs it: ``edge-runtime run`` in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
from helpers import published_name

from edge_runtime.results import load_schema


def test_run_command_processes_a_drop_and_stops_cleanly_on_sigterm(
    shared_data: Path, tiny_bundle: Path, mosquitto, subscriber_factory, tmp_path: Path
):
    prefix = f"proc/{tmp_path.name}"
    sub = subscriber_factory(f"{prefix}/#")
    env = dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(tiny_bundle),
        EDGE_RUNTIME__MQTT__HOST=mosquitto.host,
        EDGE_RUNTIME__MQTT__PORT=str(mosquitto.port),
        EDGE_RUNTIME__MQTT__TOPIC_PREFIX=prefix,
        EDGE_RUNTIME__MQTT__CLIENT_ID="edge-proc-test",
        EDGE_RUNTIME__INBOX__SETTLE_SECONDS="0.3",
        EDGE_RUNTIME__HEALTH__HEARTBEAT_SECONDS="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sub.wait_for(lambda ps: any(p.get("state") == "online" for p in ps), timeout_s=30)
        src = shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg"
        (tmp_path / "inbox" / "scan.jpeg").write_bytes(src.read_bytes())
        results = sub.wait_for(lambda ps: any(p["message_type"] == "result" for p in ps), timeout_s=30)
        result = next(p for p in results if p["message_type"] == "result")
        jsonschema.Draft202012Validator(load_schema("result-v1")).validate(result)
        assert result["input"]["file_name"] == published_name(
            src, "scan.jpeg", key_file=tmp_path / "state" / "reference.key"
        )
        # The heartbeat carries counters on the retained status topic ...
        beat = sub.wait_for(
            lambda ps: any(p.get("counters", {}).get("processed") == 1 for p in ps), timeout_s=10
        )
        status = next(p for p in beat if p.get("counters", {}).get("processed") == 1)
        jsonschema.Draft202012Validator(load_schema("status-v1")).validate(status)
        assert status["state"] == "online" and status["counters"]["outbox_pending"] == 0
        # ... and the local health check says healthy.
        health = subprocess.run(
            [sys.executable, "-m", "edge_runtime.cli", "health"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout)["counters"]["processed"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    sub.wait_for(lambda ps: ps[-1].get("state") == "offline", timeout_s=10)
    assert sub.messages[-1][1]["reason"] == "service stopped"
    # One JSON log line per event, including the per-scan stages.
    events = [json.loads(line).get("event") for line in stderr.splitlines() if line.startswith("{")]
    for expected in ("received", "decoded", "inferred", "published"):
        assert expected in events, f"no {expected!r} event in the log:\n{stderr}"
    assert (tmp_path / "state" / "journal.sqlite3").is_file()
    health = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "health"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert health.returncode == 1 and "offline" in health.stderr
    assert list((tmp_path / "inbox").iterdir()) == []
