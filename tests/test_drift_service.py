"""Issue 26: the running service watches its site drift, and says so on MQTT and in its health.

Real parts: the bundled model (its OOD check and validation reference), real Kermany and NIH
images dropped in the inbox, real Mosquitto. Paediatric scans first (no alarm), then adults:
the drift alarm rises, on the drift topic, in the status and in ``edge-runtime health``, and
the windows survive a restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from edge_runtime.bundle import load_bundle
from edge_runtime.config import RuntimeConfig
from edge_runtime.drift_watch import SiteDrift
from edge_runtime.service import EdgeService
from tests.helpers import _service_mapping, drop

KERMANY_TEST = "cxr/kermany_pneumonia_224/test"
NIH = "cxr/nih_chestxray14_1024_subset/images"
#: Small windows so the test runs in seconds; the rule is the production one.
WINDOW, MIN_SCANS = 60, 20


def _config(tmp_path: Path, broker, bundle: Path) -> RuntimeConfig:
    mapping = _service_mapping(tmp_path, broker, bundle, 2, SettleSeconds=0.2)
    return RuntimeConfig.from_mapping(
        {
            **mapping,
            "Drift": {"WindowScans": WINDOW, "MinScans": MIN_SCANS},
            "Health": {"HeartbeatSeconds": 1, "File": str(tmp_path / "state" / "health.json")},
            "Reports": {"DicomSr": False, "Fhir": False, "Heatmap": False},
        }
    )


def _results(sub, count: int, timeout_s: float = 120) -> list[dict]:
    return [
        p
        for p in sub.wait_for(
            lambda ps: len([p for p in ps if p.get("message_type") == "result"]) >= count, timeout_s
        )
        if p.get("message_type") == "result"
    ]


def test_adult_scans_after_paediatric_ones_raise_the_drift_alarm_everywhere(
    shared_data: Path, default_bundle: Path, mosquitto, subscriber_factory, tmp_path: Path
) -> None:
    manifest = load_bundle(default_bundle).manifest
    if manifest.monitoring is None or manifest.intended_use.ood is None:
        pytest.fail("the bundled model must carry an OOD check and a drift reference (issue 26)")
    config = _config(tmp_path, mosquitto, default_bundle)
    sub = subscriber_factory(f"{config.mqtt.topic_prefix}/#")
    service = EdgeService(config)
    service.start()
    try:
        assert service.mqtt is not None and service.mqtt.wait_connected(10)
        children = sorted((shared_data / KERMANY_TEST).glob("*/*.jpeg"))[::15][:40]
        for path in children:
            drop(path, config.inbox.path)
        _results(sub, len(children))
        assert service.drift is not None
        before = service.drift.report()
        assert before.state in ("ok", "watch"), before.summary()

        adults = sorted((shared_data / NIH).glob("*.png"))
        to_alarm = None
        for start in range(0, len(adults), 5):
            for path in adults[start : start + 5]:
                drop(path, config.inbox.path)
            _results(sub, len(children) + start + 5)
            if service.drift.report().state == "alarm":
                to_alarm = start + 5
                break
        assert to_alarm is not None, service.drift.report().summary()
        # A fifth of the window outside the intended use is the alarm level: 12 of 60, plus what
        # the significance test asks for; 25 adults is a generous bound.
        assert to_alarm <= 25, to_alarm
        print(f"drift alarm after {to_alarm} adult scans (window {WINDOW}, warm-up {MIN_SCANS})")

        def drift_alarm(payloads: list[dict]) -> bool:
            return any(p.get("message_type") == "drift" and p["report"]["state"] == "alarm" for p in payloads)

        payloads = sub.wait_for(drift_alarm, timeout_s=10)
        report = next(p for p in reversed(payloads) if p.get("message_type") == "drift")["report"]
        assert any("outside" in reason for reason in report["reasons"]), report["reasons"]
        status = sub.wait_for(
            lambda ps: any(
                p.get("message_type") == "status" and (p.get("drift") or {}).get("state") == "alarm"
                for p in ps
            ),
            timeout_s=10,
        )
        schema = json.loads(
            (Path(__file__).parents[1] / "edge_runtime/schemas/status-v1.schema.json").read_text()
        )
        for payload in status:
            if payload.get("message_type") == "status":
                jsonschema.validate(payload, schema)

        time.sleep(1.5)  # a heartbeat writes the health file and saves the windows
        health = subprocess.run(
            [sys.executable, "-m", "edge_runtime.cli", "health"],
            capture_output=True,
            text=True,
            check=False,
            env={"EDGE_RUNTIME__HEALTH__FILE": str(config.health.file), "PATH": "/usr/bin:/bin"},
            timeout=60,
        )
        assert "DRIFT ALARM" in health.stderr and "Drift monitoring: ALARM" in health.stderr
        assert json.loads(health.stdout)["drift"]["state"] == "alarm"
        assert health.returncode == 0, health.stderr  # the box itself is healthy
    finally:
        service.stop()

    # A restart keeps the windows: the monitor the next start builds is in alarm before any new scan.
    assert manifest.monitoring is not None
    reference = manifest.monitoring.reference
    restored = SiteDrift(config.drift, config.drift_state_path, lambda: reference)
    assert restored.report().state == "alarm"


def test_the_monitor_learns_only_what_the_result_publishes_and_keeps_it_on_restart(tmp_path: Path) -> None:
    from edge_runtime.config import DriftConfig
    from edge_runtime.drift_watch import observation_of, spacing_band
    from edge_runtime.results import IntendedUseVerdict, ScanResult
    from tests.helpers import make_analysis

    outside = IntendedUseVerdict(
        within=False, reasons=("r",), age_checked=True, ood_score=12.5, ood_threshold=3.0
    )
    metadata = {"modality": "CR", "view_position": "PA", "pixel_spacing_mm": [0.139, 0.139]}
    analysis = make_analysis([0.2, 0.8], metadata=metadata, intended_use=outside)
    result = ScanResult.of(analysis, message_id="b" * 64, priority="routine")
    seen = observation_of(result, manufacturer="Acme DR", at=1000.0)
    assert (seen.within, seen.ood_score, seen.probability, seen.positive) == (False, 12.5, None, None)
    assert dict(seen.metadata) == {
        "modality": "CR",
        "view": "PA",
        "pixel_spacing": "0.10-0.15 mm",
        "manufacturer": "Acme DR",
        "kind": "dicom",
    }
    assert spacing_band(None) is None and spacing_band((0.2, 0.2)) == "0.20-0.25 mm"
    within = ScanResult.of(
        make_analysis([0.2, 0.8], metadata=metadata), message_id="c" * 64, priority="routine"
    )
    assert observation_of(within).probability == 0.8 and observation_of(within).positive is True

    path = tmp_path / "drift-state.json"
    drift = SiteDrift(DriftConfig(WindowScans=20, MinScans=10), path, lambda: None)
    for _ in range(12):
        drift.observe_result(result, "Acme DR")
    assert drift.report().state == "alarm" and drift.report().scans.n == 12
    drift.save()
    restored = SiteDrift(DriftConfig(WindowScans=20, MinScans=10), path, lambda: None)
    assert restored.report().scans.n == 12 and restored.report().state == "alarm"
    path.write_text("{not json")
    assert SiteDrift(DriftConfig(WindowScans=20, MinScans=10), path, lambda: None).report().scans.n == 0
