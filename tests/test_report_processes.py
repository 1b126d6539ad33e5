"""Reports built in child processes: a child that dies costs the report, never the result or the service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import PNEUMONIA_JPEG, TEST_TRUSTED_KEYS, chest_dicom_from_jpeg

from edge_runtime.config import RuntimeConfig
from edge_runtime.pipeline import ScanAnalyzer
from edge_runtime.reports.processes import ReportProcesses


def _config(tmp_path: Path) -> RuntimeConfig:
    return RuntimeConfig.from_mapping(
        {
            "Journal": {"Path": str(tmp_path / "state" / "journal.sqlite3")},
            "Model": {"TrustedKeys": TEST_TRUSTED_KEYS},
        }
    )


def _children(reports: ReportProcesses) -> list[int]:
    executor = reports._pool()
    deadline = time.monotonic() + 10
    while not executor._processes and time.monotonic() < deadline:  # started lazily
        time.sleep(0.05)
    return list(executor._processes)


def test_a_killed_report_process_costs_one_report_then_a_new_one_takes_over(
    shared_data, default_bundle, tmp_path
):
    config = _config(tmp_path)
    analyzer = ScanAnalyzer.from_bundle_path(default_bundle)
    # A child's CR: within the model's intended use, so it gets every report, heat-map included.
    outcome = analyzer.analyze(chest_dicom_from_jpeg(shared_data / PNEUMONIA_JPEG, tmp_path / "child.dcm"))
    analyzer.close()
    reports = ReportProcesses(1)
    try:

        def write() -> dict:
            links = reports.write(
                config, outcome.result(), outcome.header, image=outcome.image, heatmap=outcome.heatmap
            )
            assert links is not None
            return links.model_dump(exclude_none=True)

        first = write()
        assert "error" not in first and {"sr", "fhir", "heatmap_png", "heatmap_dicom"} <= set(first)
        # The same files as the in-process writer would have written (the child ran the same build).
        folder = config.reports_path / first["folder"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "fhir.json",
            "heatmap.dcm",
            "heatmap.png",
            "sr.dcm",
        ]
        for pid in _children(reports):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        broken = write()
        assert broken["error"].startswith("reports not written: the report process")
        assert "error" not in write()  # a new child took over
    finally:
        reports.close()


def test_report_processes_do_not_outlive_a_killed_service(tmp_path):
    """SIGKILL (the OOM killer) leaves no orphan report process behind."""
    script = (
        "import os, sys, time\n"
        "from edge_runtime.reports.processes import ReportProcesses\n"
        "r = ReportProcesses(2)\n"
        "r.start()\n"
        "ex = r._pool()\n"
        "deadline = time.monotonic() + 20\n"
        "while len(ex._processes) < 2 and time.monotonic() < deadline: time.sleep(0.05)\n"
        "print(' '.join(map(str, ex._processes)), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in pids if _alive(pid)]
    assert alive == [], f"report processes {alive} outlived the service"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent is gone for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_with_child_idle_seconds_the_report_child_starts_when_due_and_exits_when_idle(
    shared_data, default_bundle, tmp_path
):
    """Reports.ChildIdleSeconds: no child before the first DICOM report, none again after the pause.

    The memory between bursts (about 150 MB, docs/performance.md) is given back; the next report
    starts a new child and is written as before.
    """
    config = RuntimeConfig.from_mapping(
        {
            "Journal": {"Path": str(tmp_path / "state" / "journal.sqlite3")},
            "Model": {"TrustedKeys": TEST_TRUSTED_KEYS},
            "Reports": {"ChildIdleSeconds": 1.0},
        }
    )
    analyzer = ScanAnalyzer.from_bundle_path(default_bundle)
    outcome = analyzer.analyze(chest_dicom_from_jpeg(shared_data / PNEUMONIA_JPEG, tmp_path / "child.dcm"))
    analyzer.close()
    reports = ReportProcesses(1)
    try:
        reports.start(config.reports.child_idle_seconds)
        assert reports._executor is None  # nothing started before a report is due

        def write() -> dict:
            links = reports.write(
                config, outcome.result(), outcome.header, image=outcome.image, heatmap=outcome.heatmap
            )
            assert links is not None
            return links.model_dump(exclude_none=True)

        assert "error" not in write()
        executor = reports._executor
        assert executor is not None
        pids = list(executor._processes)
        assert pids
        deadline = time.monotonic() + 10
        while reports._executor is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reports._executor is None, "the idle report child did not exit"
        for pid in pids:  # gone, not left as a zombie or an orphan
            assert (
                not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )
        again = write()
        assert "error" not in again and {"sr", "fhir", "heatmap_png", "heatmap_dicom"} <= set(again)
    finally:
        reports.close()
