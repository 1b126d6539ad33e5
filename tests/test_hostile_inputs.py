"""Issue 14's probes, run again: what a hostile or careless network leaves in the inbox.

Real service, real Mosquitto, real files, real FIFOs and links. Each input ends
published once or quarantined once with a readable reason; no worker stalls;
no file outside the inbox is read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import drop, published_name
from helpers import service_config as make_config

from edge_runtime import decode as decode_stage
from edge_runtime.service import EdgeService

JPEG = "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg"


def _start(tmp_path: Path, broker, bundle: Path, **inbox) -> tuple[EdgeService, object]:
    config = make_config(tmp_path, broker, bundle, **inbox)
    service = EdgeService(config)
    service.start()
    assert service.mqtt is not None and service.mqtt.wait_connected(10)
    return service, config


def _wait(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)


def _errors(quarantine: Path) -> dict[str, dict]:
    return {
        p.name.removesuffix(".error.json"): json.loads(p.read_text()) for p in quarantine.glob("*.error.json")
    }


def test_fifos_and_device_links_do_not_stall_the_workers(
    shared_data, tiny_bundle, mosquitto, subscriber_factory, tmp_path
):
    """Two FIFOs stopped both workers; a JPEG dropped afterwards waited until they were written to."""
    service, config = _start(tmp_path, mosquitto, tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    try:
        inbox = config.inbox.path
        os.mkfifo(inbox / "pipe1.dcm")
        os.mkfifo(inbox / "pipe2.dcm")
        os.symlink("/dev/zero", inbox / "zero.dcm")
        time.sleep(1.0)  # the FIFOs are offered first
        dropped = time.monotonic()
        drop(shared_data / JPEG, inbox, "after.jpeg")
        (result,) = sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=15)
        assert time.monotonic() - dropped < 10
        assert result["input"]["file_name"] == published_name(shared_data / JPEG, "after.jpeg", config)
        _wait(lambda: len(_errors(config.inbox.quarantine_path)) >= 3)
        errors = _errors(config.inbox.quarantine_path)
        assert errors["pipe1.dcm"]["code"] == errors["pipe2.dcm"]["code"] == "not_a_regular_file"
        assert "named pipe" in errors["pipe1.dcm"]["error"]
        assert errors["zero.dcm"]["code"] == "symlink_refused"
        assert list(inbox.iterdir()) == []
        assert service.journal.counts()["quarantined"] == 3
        assert service.health.snapshot()["state"] == "online"
    finally:
        service.stop()


def test_symlinks_are_not_followed_out_of_the_inbox(
    shared_data, tiny_bundle, mosquitto, subscriber_factory, tmp_path
):
    outside = tmp_path / "elsewhere" / "private.jpeg"
    outside.parent.mkdir()
    shutil.copyfile(shared_data / JPEG, outside)
    service, config = _start(tmp_path, mosquitto, tiny_bundle, Symlinks="inside-inbox")
    sub = subscriber_factory(config.mqtt.results_topic)
    try:
        inbox = config.inbox.path
        (inbox / ".store").mkdir()  # hidden: not a scan itself, a sender's staging area
        shutil.copyfile(shared_data / JPEG, inbox / ".store" / "real.jpeg")
        os.symlink(inbox / ".store" / "real.jpeg", inbox / "inside-link.jpeg")
        os.symlink(outside, inbox / "outside-link.jpeg")
        (result,) = sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=20)
        assert result["input"]["file_name"] == published_name(shared_data / JPEG, "inside-link.jpeg", config)
        # The journal's verdict comes first, the error file right after it (outcomes.quarantine).
        _wait(lambda: bool(_errors(config.inbox.quarantine_path)))
        assert service.journal.counts()["quarantined"] == 1
        errors = _errors(config.inbox.quarantine_path)
        assert set(errors) == {"outside-link.jpeg"}
        assert errors["outside-link.jpeg"]["code"] == "symlink_refused"
        assert "outside the inbox" in errors["outside-link.jpeg"]["error"]
        assert outside.read_bytes() == (shared_data / JPEG).read_bytes()  # never touched
        # Both links leave the inbox: the inside one once published, the outside one moved to
        # quarantine just after its error file is written.
        _wait(lambda: sorted(p.name for p in inbox.iterdir()) == [".store"])
        assert sorted(p.name for p in inbox.iterdir()) == [".store"]  # the links disposed of
        time.sleep(0.5)
        assert len(sub.results()) == 1
    finally:
        service.stop()


def test_odd_names_end_published_or_quarantined_not_retried_for_ever(
    shared_data, tiny_bundle, mosquitto, subscriber_factory, tmp_path
):
    service, config = _start(tmp_path, mosquitto, tiny_bundle)
    sub = subscriber_factory(config.mqtt.results_topic)
    try:
        inbox = config.inbox.path
        not_utf8 = Path(os.fsdecode(bytes(inbox) + b"/IM-\xff\xfe-scan.jpeg"))
        shutil.copyfile(shared_data / JPEG, not_utf8)
        long_name = "SMITH_" + "X" * 230 + ".jpeg"  # 241 bytes: "<name>.error.json" would not fit
        data = (shared_data / JPEG).read_bytes()
        (inbox / long_name).write_bytes(data[: len(data) // 2])
        (result,) = sub.wait_for(lambda ps: len(ps) >= 1, timeout_s=20)
        assert result["input"]["file_name"] == published_name(shared_data / JPEG, "x.jpeg", config)
        _wait(lambda: not list(inbox.iterdir()))
        assert list(inbox.iterdir()) == []
        (error_file,) = config.inbox.quarantine_path.glob("*.error.json")
        error = json.loads(error_file.read_text())
        assert error["code"] == "corrupt_image" and long_name not in error_file.read_text()
        assert len(error_file.name.encode()) <= 255
        quarantined = error_file.with_name(error_file.name.removesuffix(".error.json"))
        assert quarantined.is_file() and quarantined.name.endswith(".jpeg")
        counts = service.journal.counts()
        assert counts["done"] == 1 and counts["quarantined"] == 1
    finally:
        service.stop()


def test_a_stuck_worker_makes_the_service_degraded(
    shared_data, tiny_bundle, mosquitto, tmp_path, monkeypatch
):
    """A decoder that never returns (not isolated here) is noticed by the watchdog."""
    decode_stage.register_decoder("hang", "plugins.misbehaving:HangingDecoder", first=True)
    try:
        config = make_config(tmp_path, mosquitto, tiny_bundle, decode={"Isolate": False})
        config = config.model_copy(
            update={"health": config.health.model_copy(update={"watchdog_seconds": 1.0})}
        )
        service = EdgeService(config)
        service.start()
        try:
            (config.inbox.path / "stuck.dcm").write_bytes(b"HANG\n")
            _wait(lambda: service.health.snapshot()["state"] == "degraded", timeout_s=15)
            snapshot = service.health.snapshot()
            assert snapshot["state"] == "degraded"
            assert "a worker is stuck" in snapshot["reason"] and "limit 1 s" in snapshot["reason"]
        finally:
            service.stop(timeout_s=1)
    finally:
        decode_stage._REGISTRY.pop("hang", None)


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux capabilities")
def test_an_unreadable_file_is_quarantined_when_the_service_is_not_all_powerful(
    shared_data, tiny_bundle, mosquitto, subscriber_factory, tmp_path
):
    """As a non-root user (or root without CAP_DAC_*), a mode-000 file raised PermissionError for ever."""
    prefix = f"perm/{tmp_path.name}"
    sub = subscriber_factory(f"{prefix}/results")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = inbox / "locked.jpeg"
    shutil.copyfile(shared_data / JPEG, secret)
    secret.chmod(0)
    env = dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(tiny_bundle),
        EDGE_RUNTIME__MQTT__HOST=mosquitto.host,
        EDGE_RUNTIME__MQTT__PORT=str(mosquitto.port),
        EDGE_RUNTIME__MQTT__TOPIC_PREFIX=prefix,
        EDGE_RUNTIME__MQTT__CLIENT_ID=f"perm-{tmp_path.name}",
        EDGE_RUNTIME__INBOX__SETTLE_SECONDS="0.2",
        EDGE_RUNTIME__LOGGING__FORMAT="text",
    )
    command = [sys.executable, "-m", "edge_runtime.cli", "run"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop CAP_DAC_*")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", *command]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        error_file = tmp_path / "quarantine" / "locked.jpeg.error.json"
        _wait(error_file.exists, timeout_s=30)
        error = json.loads(error_file.read_text())
        assert error["code"] == "file_unreadable"
        assert "read access" in error["action"]
        assert not secret.exists() and list(inbox.iterdir()) == []
        assert sub.results() == []
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    assert "Traceback" not in stderr
    assert stderr.count("file_unreadable") <= 2  # reported once (log line + event), not every rescan
