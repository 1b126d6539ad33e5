"""Chaos: SIGKILL the service at random moments while it works through 200+ real files.

Afterwards every distinct input must have exactly one delivered result (counted
by a real subscriber, by idempotency key) or exactly one quarantine record;
nothing is left in the inbox or the outbox. Raw repeats (the same message_id
delivered more than once, which QoS 1 allows) are counted and printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture()
def chaos_bundle(tmp_path: Path) -> Path:
    """The bundled model when present (realistic timing), else the tiny test model."""
    from helpers import make_tiny_bundle

    from edge_runtime.bundle import default_bundle_path

    bundled = default_bundle_path()
    return bundled if (bundled / "manifest.json").is_file() else make_tiny_bundle(tmp_path / "m")


def _start(env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "run"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    shared_data: Path, chaos_bundle: Path, mosquitto, subscriber_factory, tmp_path: Path
):
    rng = random.Random(20261125)
    prefix = f"chaos/{tmp_path.name}"
    sub = subscriber_factory(f"{prefix}/results")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sources = sorted((shared_data / "cxr/kermany_pneumonia_224/test").rglob("*.jpeg"))[:200]
    sources += [
        shared_data / "dicom/pydicom_data/RG1_UNCR.dcm",
        shared_data / "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    ]
    bad = {
        "truncated.dcm": (shared_data / "dicom/pydicom_data/RG1_J2KR.dcm").read_bytes()[:4000],
        "notes.dcm": b"not an image\n" * 10,
    }
    env = dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(chaos_bundle),
        EDGE_RUNTIME__MQTT__HOST=mosquitto.host,
        EDGE_RUNTIME__MQTT__PORT=str(mosquitto.port),
        EDGE_RUNTIME__MQTT__TOPIC_PREFIX=prefix,
        EDGE_RUNTIME__MQTT__CLIENT_ID=f"chaos-{tmp_path.name}",
        EDGE_RUNTIME__INBOX__SETTLE_SECONDS="0.2",
        EDGE_RUNTIME__INBOX__RESCAN_INTERVAL_SECONDS="0.5",
        EDGE_RUNTIME__HEALTH__HEARTBEAT_SECONDS="1",
    )
    pending = list(sources)
    kills = 0
    proc = _start(env, tmp_path)
    try:
        while pending or kills < 8:
            # Keep feeding files (as .part + rename, like a DICOM receiver) ...
            for src in pending[:25]:
                part = inbox / f"{src.name}.part"
                shutil.copyfile(src, part)
                part.rename(inbox / src.name)
            pending = pending[25:]
            if kills == 3:
                for name, data in bad.items():
                    (inbox / name).write_bytes(data)
            # ... and kill the service at a random moment, then restart it.
            time.sleep(rng.uniform(0.3, 2.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
            proc = _start(env, tmp_path)
        # Let the last run finish everything.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            health_file = tmp_path / "state" / "health.json"
            if health_file.is_file() and not any(inbox.iterdir()):
                try:
                    counters = json.loads(health_file.read_text())["counters"]
                except (ValueError, KeyError):
                    counters = {}
                if counters.get("outbox_pending") == 0 and counters.get("queued") == 0:
                    break
            time.sleep(0.5)
        time.sleep(2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    expected = {hashlib.sha256(p.read_bytes()).hexdigest() for p in sources}
    results = sub.results()
    delivered = Counter(r["message_id"] for r in results)
    by_input = {r["input"]["sha256"] for r in results}
    quarantine = tmp_path / "quarantine"
    error_files = sorted(quarantine.glob("*.error.json"))
    quarantined = [json.loads(p.read_text()) for p in error_files]
    repeats = sum(n - 1 for n in delivered.values())
    print(
        f"\nchaos: {kills} SIGKILLs, {len(sources)} good files ({len(expected)} distinct), "
        f"{len(bad)} bad; subscriber saw {len(results)} result messages, "
        f"{len(delivered)} distinct message ids, {repeats} raw repeats; "
        f"{len(quarantined)} quarantine records"
    )
    assert not any(inbox.iterdir()), f"left in the inbox: {list(inbox.iterdir())}"
    assert by_input == expected, "some inputs have no delivered result"
    assert len(delivered) == len(expected)
    # The error file sits beside the quarantined file (NAME.error.json) and names it by reference.
    names = [p.name.removesuffix(".error.json") for p in error_files]
    assert sorted(names) == sorted(bad)
    codes = {name: q["code"] for name, q in zip(names, quarantined, strict=True)}
    assert codes == {"truncated.dcm": "corrupt_image", "notes.dcm": "not_an_image"}
    assert all((quarantine / name).is_file() for name in names)
