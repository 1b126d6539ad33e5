"""``edge-runtime journal`` and the journal checks at start, run as real processes.

The issue 14 probe, reproduced: five results wait for a broker that is down, the
journal is truncated to 0 bytes, the service is started again. It must refuse
with a message an admin can act on, not report "0 results awaiting delivery".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import free_port

from edge_runtime.journal import Delivery, Journal, check_journal, id_path_for

NORMAL = "cxr/kermany_pneumonia_224/test/NORMAL"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def _config(tmp_path: Path, journal: Path) -> Path:
    config = tmp_path / "edge.yaml"
    config.write_text(f"Journal: {{Path: {journal}}}\n")
    return config


def _journal_with_pending(path: Path, n: int) -> Journal:
    journal = Journal(path)
    for i in range(n):
        record = journal.admit(f"{i:064x}", path.parent / f"scan{i}.dcm", 10).record
        message = {"message_id": f"m{i}"}
        journal.record_result(
            record.id, message["message_id"], json.dumps(message), [Delivery("mqtt", "t", "{}", 1)]
        )
    return journal


def test_help_explains_the_journal_commands_and_the_flag():
    out = run_cli("journal", "--help")
    assert out.returncode == 0
    for words in ("check", "backup", "journal.id", "refuses to start"):
        assert words in out.stdout
    check = run_cli("journal", "check", "--help").stdout
    assert "integrity" in check and "awaiting delivery" in check and "--config" in check
    backup = run_cli("journal", "backup", "--help").stdout
    assert "online backup" in backup and "restored" in backup and "never overwritten" in backup
    run = run_cli("run", "--help").stdout
    assert "--new-journal" in run and "moved aside" in run and "NOT sent" in run


def test_check_prints_id_and_counts_and_fails_with_the_reason(tmp_path: Path):
    path = tmp_path / "state" / "journal.sqlite3"
    config = _config(tmp_path, path)
    journal = _journal_with_pending(path, 3)
    journal_id = journal.journal_id
    out = run_cli("journal", "check", "--config", str(config))  # while the journal is open
    journal.close()
    assert out.returncode == 0, out.stderr
    assert f"{journal_id} (matches journal.id)" in out.stdout
    assert "done:              3" in out.stdout
    assert "awaiting delivery: 3 (mqtt 3)" in out.stdout
    as_json = json.loads(run_cli("journal", "check", "--config", str(config), "--json").stdout)
    assert as_json["journal_id"] == journal_id and as_json["counts"]["outbox_pending"] == 3

    path.write_bytes(b"\x00garbage" * 512)
    out = run_cli("journal", "check", "--config", str(config))
    assert out.returncode == 1 and out.stdout == ""
    assert f"error: The service will not start: the journal {path}" in out.stderr
    assert "not a SQLite database" in out.stderr
    assert "→ Stop the service. Restore journal.sqlite3 from your latest backup" in out.stderr
    assert "disk space" not in out.stderr


def test_backup_while_a_writer_runs_then_check_the_copy(tmp_path: Path):
    path = tmp_path / "state" / "journal.sqlite3"
    config = _config(tmp_path, path)
    writer = _journal_with_pending(path, 5)
    stop = threading.Event()

    def write() -> None:
        i = 1000
        while not stop.is_set():
            record = writer.admit(f"{i:064x}", tmp_path / f"{i}.dcm", 10).record
            writer.record_result(record.id, f"m{i}", "{}", [Delivery("mqtt", "t", "{}", 1)])
            i += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        dest = tmp_path / "backup" / "journal-copy.sqlite3"
        out = run_cli("journal", "backup", "--config", str(config), str(dest))
    finally:
        stop.set()
        thread.join()
    writer.close()
    assert out.returncode == 0, out.stderr
    assert f"backup of {path} written: {dest}" in out.stdout
    assert writer.journal_id in out.stdout
    copy = check_journal(dest)
    assert copy.journal_id == writer.journal_id and not id_path_for(dest).exists()
    assert copy.counts["done"] == copy.counts["outbox_pending"] >= 5
    again = run_cli("journal", "backup", "--config", str(config), str(dest))
    assert again.returncode == 1 and "already exists; nothing was overwritten" in again.stderr
    checked = run_cli("journal", "check", "--journal", str(dest))
    assert checked.returncode == 0 and copy.journal_id in checked.stdout


def _start(cwd: Path, env: dict, *extra: str) -> subprocess.Popen:
    """Start ``edge-runtime run``; returns once it is up (it has written its health file)."""
    health = cwd / "state" / "health.json"
    health.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "run", *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(health.is_file, proc)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    return stderr


def _wait_for(predicate, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited early:\n{proc.communicate()[1]}")
        try:
            if predicate():
                return
        except Exception:  # the journal may not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_probe_truncated_journal_refuses_start_then_restore_or_start_over(
    shared_data: Path, tiny_bundle: Path, tmp_path: Path
):
    box = tmp_path / "box"
    (box / "inbox").mkdir(parents=True)
    journal = box / "state" / "journal.sqlite3"
    env = dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(tiny_bundle),
        EDGE_RUNTIME__MQTT__HOST="127.0.0.1",
        EDGE_RUNTIME__MQTT__PORT=str(free_port()),  # nothing listens: the broker is down
        EDGE_RUNTIME__MQTT__CLIENT_ID="edge-journal-probe",
        EDGE_RUNTIME__INBOX__SETTLE_SECONDS="0.2",
        EDGE_RUNTIME__INBOX__RESCAN_INTERVAL_SECONDS="0.5",
        EDGE_RUNTIME__LOGGING__FORMAT="text",
        EDGE_RUNTIME__HEALTH__HEARTBEAT_SECONDS="1",
    )
    proc = _start(box, env)
    try:
        for src in sorted((shared_data / NORMAL).glob("*.jpeg"))[:5]:
            (box / "inbox" / src.name).write_bytes(src.read_bytes())
        _wait_for(lambda: check_journal(journal).counts["done"] == 5, proc)
    finally:
        _stop(proc)
    assert list((box / "inbox").iterdir()) == []  # the scans are gone: only the journal has them
    # Five results wait for the broker, each twice: the tiny model calls them positive (urgent),
    # so each also has a row for the priority topic.
    assert check_journal(journal).counts["outbox_pending"] == 10
    backup = run_cli("journal", "backup", str(tmp_path / "journal-backup.sqlite3"), cwd=box, env=env)
    assert backup.returncode == 0, backup.stderr

    # The probe: truncate to 0 bytes and start again.
    journal.write_bytes(b"")
    refused = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "run"],
        cwd=box,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert f"error: The service will not start: the journal {journal} is empty (0 bytes)" in refused.stderr
    assert "journal backup" in refused.stderr and "--new-journal" in refused.stderr
    assert "0 results awaiting delivery" not in refused.stderr
    assert journal.stat().st_size == 0  # refused, not recreated

    # Restore the backup in place: the five results are awaiting delivery again.
    journal.write_bytes((tmp_path / "journal-backup.sqlite3").read_bytes())
    log = _stop(_start(box, env))
    assert "5 results awaiting delivery" in log

    # Or start over explicitly: the old files are moved aside and the loss is logged.
    journal.write_bytes(b"")
    log = _stop(_start(box, env, "--new-journal"))
    assert "WARNING" in log and "--new-journal" in log and "are NOT sent" in log
    assert "0 results awaiting delivery" in log
    moved = sorted(p.name for p in journal.parent.glob("journal.old-*"))
    assert [n for n in moved if n.endswith(".sqlite3")] and [n for n in moved if n.endswith(".id")]
