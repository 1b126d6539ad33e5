"""The state folder, the instance lock and the start-up checks, as an admin meets them.

Real parts: ``edge-runtime run`` in its own process against a real Mosquitto,
a real SQLite journal, a real read-only mount (``unshare -m`` + a read-only
bind mount as root, whom ``chmod`` does not stop), a real busy port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

from edge_runtime.errors import JournalIntegrityError, JournalInUse, JournalLost
from edge_runtime.journal import Delivery, Journal, check_journal
from edge_runtime.journal_integrity import anchor_path_for

SCANS = "cxr/kermany_pneumonia_224/test"
CLI = [sys.executable, "-m", "edge_runtime.cli"]


# -- the journal alone: lock, anchor, lost while open -------------------------------------------
def test_a_second_journal_on_the_same_file_is_refused_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite3"
    first = Journal(path)
    try:
        with pytest.raises(JournalInUse) as caught:
            Journal(path)
        assert f"PID {os.getpid()}" in caught.value.message
        assert (tmp_path / "state" / "journal.lock").read_text().strip() == str(os.getpid())
    finally:
        first.close()
    Journal(path).close()  # closing freed the lock


def test_deleting_the_lock_file_under_a_running_service_does_not_let_a_second_one_in(
    tmp_path: Path,
) -> None:
    """``rm state/journal.lock`` while the first runs: the second locked a new file of that name and ran."""
    path = tmp_path / "state" / "journal.sqlite3"
    first = Journal(path)
    try:
        (tmp_path / "state" / "journal.lock").unlink()
        with pytest.raises(JournalInUse) as caught:
            Journal(path)
        # The PID file is gone: the holder is found from the kernel's lock table instead.
        assert f"PID {os.getpid()}" in caught.value.message
        assert f"kill {os.getpid()}" in caught.value.action
    finally:
        first.close()
    Journal(path).close()  # closing freed both locks
    assert (tmp_path / "state" / "journal.lock").read_text().strip() == str(os.getpid())


def test_a_deleted_state_folder_is_not_a_first_start(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite3"
    journal = Journal(path)
    journal_id = journal.journal_id
    journal.close()
    anchor = anchor_path_for(path)
    assert anchor == tmp_path / "state.journal.id"
    assert anchor.read_text().splitlines()[0] == journal_id
    shutil.rmtree(tmp_path / "state")  # the probe: rm -rf state
    with pytest.raises(JournalIntegrityError) as caught:
        Journal(path)
    assert str(anchor) in caught.value.message and journal_id in caught.value.message
    assert "--new-journal" in caught.value.action
    # A journal in a folder nobody used before is a first start, anchor or not beside it.
    Journal(tmp_path / "other" / "journal.sqlite3").close()
    # Starting over, as asked: a new journal, and the anchor follows it.
    fresh = Journal(path, start_new=True)
    assert fresh.journal_id != journal_id and anchor.read_text().splitlines()[0] == fresh.journal_id
    fresh.close()


def test_a_journal_deleted_while_open_refuses_writes_and_can_be_rescued(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite3"
    journal = Journal(path)
    noticed: list[str] = []
    journal.on_lost = noticed.append
    done = journal.admit("a" * 64, tmp_path / "a.dcm", 10).record
    journal.record_result(done.id, "m1", '{"message_id":"m1"}', [Delivery("mqtt", "t", "{}", 1)])
    assert journal.verify_on_disk() is None
    for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm", "journal.id"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    with pytest.raises(JournalLost) as caught:
        journal.admit("b" * 64, tmp_path / "b.dcm", 10)  # the scan would leave the inbox after this
    assert "was deleted while the service ran" in caught.value.message
    assert len(noticed) == 1 and journal.verify_on_disk() == noticed[0]
    # Delivery marks still go in (they only make the saved copy more accurate).
    journal.mark_delivered(*(m.seq for m in journal.pending_messages("mqtt")))
    rescued = journal.save_rescue_copy()
    journal.close()
    assert rescued is not None and rescued.name.startswith("journal.rescued-")
    shutil.move(rescued, path)  # the restore the ERROR line tells the admin to do
    report = check_journal(path)
    assert report.counts["done"] == 1 and report.counts["outbox_pending"] == 0
    Journal(path).close()  # adopted: same id as the anchor


# -- the service as an admin runs it ---------------------------------------------------------------
def _env(tmp_path: Path, tiny_bundle: Path, mosquitto, prefix: str) -> dict[str, str]:
    return dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(tiny_bundle),
        EDGE_RUNTIME__MQTT__HOST=mosquitto.host,
        EDGE_RUNTIME__MQTT__PORT=str(mosquitto.port),
        EDGE_RUNTIME__MQTT__TOPIC_PREFIX=prefix,
        EDGE_RUNTIME__MQTT__CLIENT_ID=f"edge-{prefix.replace('/', '-')}",
        EDGE_RUNTIME__INBOX__SETTLE_SECONDS="0.3",
        EDGE_RUNTIME__INBOX__RESCAN_INTERVAL_SECONDS="0.5",
        EDGE_RUNTIME__HEALTH__HEARTBEAT_SECONDS="1",
        EDGE_RUNTIME__WORKERS="1",
    )


def _start(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "run", *extra],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    return stderr


def _status(sub, since: int = 0, **wanted: str) -> list[dict]:
    def seen(payloads: list[dict]) -> bool:
        return any(
            p.get("message_type") != "result" and all(p.get(k) == v for k, v in wanted.items())
            for p in payloads[since:]
        )

    return sub.wait_for(seen, timeout_s=30)


def _drop(shared_data: Path, inbox: Path, name: str, n: int) -> Path:
    src = sorted((shared_data / SCANS / "NORMAL").glob("*.jpeg"))[n]
    target = inbox / name
    part = target.with_name(name + ".part")
    part.write_bytes(src.read_bytes())
    part.rename(target)
    return target


def _log_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_state_folder_deleted_while_running_pauses_intake_and_restart_is_refused(
    shared_data: Path, tiny_bundle: Path, mosquitto, subscriber_factory, tmp_path: Path
) -> None:
    prefix = f"state/{tmp_path.name}"
    sub = subscriber_factory(f"{prefix}/#")
    env = _env(tmp_path, tiny_bundle, mosquitto, prefix)
    proc = _start(tmp_path, env)
    try:
        _status(sub, state="online")
        _drop(shared_data, tmp_path / "inbox", "first.jpeg", 0)
        sub.wait_for(lambda ps: any(p.get("message_type") == "result" for p in ps))
        seen = len(sub.messages)

        shutil.rmtree(tmp_path / "state")  # the probe: rm -rf state, service running
        beat = _status(sub, seen, state="degraded")
        status = next(p for p in beat[seen:] if p.get("state") == "degraded")
        assert "journal lost" in status["reason"] and "was deleted" in status["reason"]
        # Intake paused: a scan dropped now stays in the inbox, unprocessed and unforgotten.
        second = _drop(shared_data, tmp_path / "inbox", "second.jpeg", 1)
        time.sleep(3.0)  # six rescans, three heartbeats
        assert second.is_file()
        assert len(sub.results()) == 1
        health = json.loads((tmp_path / "state" / "health.json").read_text())
        assert health["state"] == "degraded" and "journal lost" in health["reason"]
        rescued = sorted((tmp_path / "state").glob("journal.rescued-*.sqlite3"))
        assert len(rescued) == 1
    finally:
        stderr = _stop(proc)
    errors = [r for r in _log_lines(stderr) if r["level"] == "ERROR"]
    lost = [r for r in errors if r["msg"].startswith("journal lost")]
    assert len(lost) == 1, stderr
    assert f"mv {rescued[0]}" in lost[0]["msg"] and "--new-journal" in lost[0]["msg"]
    # The saved copy is the journal as it was: one scan done, its result delivered.
    report = check_journal(rescued[0])
    assert report.counts["done"] == 1 and report.counts["outbox_pending"] == 0

    # Restart: refused, naming what was found and what to do.
    refused = subprocess.run([*CLI, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: The service will not start:")
    assert str(tmp_path / "state.journal.id") in refused.stderr
    assert "→ Stop the service. The service that ran with it saved a copy" in refused.stderr
    assert f"mv {rescued[0]}" in refused.stderr and "--new-journal" in refused.stderr
    assert second.is_file()

    # Starting over, as asked: it starts, and the waiting scan gets its result.
    seen = len(sub.messages)
    proc = _start(tmp_path, env, "--new-journal")
    try:
        _status(sub, seen, state="online")
        sub.wait_for(lambda ps: len([p for p in ps if p.get("message_type") == "result"]) == 2)
        assert not second.exists()
    finally:
        stderr = _stop(proc)
    assert any("starting over with a new journal" in r["msg"] for r in _log_lines(stderr))


def test_a_second_instance_is_refused_naming_the_first_which_runs_on(
    shared_data: Path, tiny_bundle: Path, mosquitto, subscriber_factory, tmp_path: Path
) -> None:
    prefix = f"twice/{tmp_path.name}"
    sub = subscriber_factory(f"{prefix}/#")
    env = _env(tmp_path, tiny_bundle, mosquitto, prefix)
    first = _start(tmp_path, env)
    try:
        _status(sub, state="online")
        t0 = time.monotonic()
        second = subprocess.run(
            [*CLI, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        refused_in_s = time.monotonic() - t0
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith("error: Another edge-runtime service (PID ")
        assert f"PID {first.pid})" in second.stderr and "→ " in second.stderr
        assert f"kill {first.pid}" in second.stderr
        assert refused_in_s < 30
        # The first one was not disturbed: still online, still taking scans.
        seen = len(sub.messages)
        _drop(shared_data, tmp_path / "inbox", "after.jpeg", 2)
        sub.wait_for(lambda ps: any(p.get("message_type") == "result" for p in ps[seen:]))
        _status(sub, seen, state="online")
        assert first.poll() is None
        # Never knocked off the broker (its last will would say offline).
        assert not any(p.get("state") == "offline" for _, p, _ in sub.messages)
    finally:
        stderr = _stop(first)
    lines = _log_lines(stderr)
    assert not [r for r in lines if r["level"] == "ERROR"], stderr
    assert len([r for r in lines if r["msg"].startswith("MQTT connected")]) == 1, stderr


# -- start-up checks: `run` and `config check` share them ------------------------------------------
def _as_read_only(folder: Path, command: list[str]) -> list[str]:
    """``command`` seeing ``folder`` read-only: a bind mount in a private mount namespace (root)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(folder), *command]


def test_a_read_only_inbox_is_refused_at_start_by_run_and_config_check(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    env = dict(os.environ, EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(tiny_bundle))
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("running as root, where chmod does not stop writes, and unshare is missing")
        probe = subprocess.run(_as_read_only(inbox, ["true"]), capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"running as root, and a read-only bind mount is not allowed here: {probe.stderr}")
        wrap = lambda cmd: _as_read_only(inbox, cmd)  # noqa: E731
        why = "Read-only file system"
    else:
        inbox.chmod(0o555)
        wrap = lambda cmd: cmd  # noqa: E731
        why = "Permission denied"
    try:
        for command in (["run"], ["config", "check"]):
            done = subprocess.run(
                wrap([*CLI, *command]), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 2, (command, done.stderr)
            assert done.stderr.startswith(f"error: Inbox.Path: {inbox} is not writable"), done.stderr
            assert why in done.stderr and "→ " in done.stderr
    finally:
        inbox.chmod(0o755)
    # Refused before the journal was opened (only its lock was taken, and freed).
    assert not (tmp_path / "state" / "journal.sqlite3").exists()
    assert not (tmp_path / "state.journal.id").exists()
    assert list(inbox.iterdir()) == []  # and the probes left nothing behind


def test_config_check_names_a_bad_network_and_a_spool_inside_the_inbox_together(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(
        "Inbox: {Path: inbox}\n"
        "Dicom: {Enabled: true, AllowedAddresses: [10.20.0.0/16, 10.0.0.0/33], SpoolPath: inbox/spool}\n"
    )
    done = subprocess.run(
        [*CLI, "config", "check", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"error: Invalid configuration ({config}")
    assert any(
        line.startswith("  - Dicom.AllowedAddresses: ") and "'10.0.0.0/33' is not an IP address" in line
        for line in lines
    ), done.stderr
    assert any(
        line.startswith(f"  - Dicom.SpoolPath {tmp_path / 'inbox' / 'spool'} is inside Inbox.Path")
        for line in lines
    ), done.stderr


def test_config_check_names_a_dicom_port_in_use(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        env = dict(
            os.environ,
            EDGE_RUNTIME__DICOM__ENABLED="true",
            EDGE_RUNTIME__DICOM__BIND_ADDRESS="127.0.0.1",
            EDGE_RUNTIME__DICOM__PORT=str(port),
        )
        done = subprocess.run(
            [*CLI, "config", "check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: Dicom.Port: port {port} on 127.0.0.1 is already in use")
    assert "ss -ltnp" in done.stderr
    assert not (tmp_path / "inbox").exists()  # config check creates nothing
