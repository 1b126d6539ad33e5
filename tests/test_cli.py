"""The ``edge-runtime`` console script, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
from helpers import published_name

from edge_runtime.results import load_schema

SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_help_explains_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("run", "process", "config", "model", "EDGE_RUNTIME__", "mosquitto_sub"):
        assert word in out.stdout


def test_process_prints_one_valid_result_per_file_and_fails_only_on_failure(
    shared_data: Path, tiny_bundle: Path, tmp_path: Path
):
    import os

    env = dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(tiny_bundle),
        # No box key there: 'process' uses one only where a service created it, never makes one.
        EDGE_RUNTIME__JOURNAL__PATH=str(tmp_path / "state" / "journal.sqlite3"),
    )
    good = [shared_data / SIIM, shared_data / "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg"]
    out = run_cli("process", *map(str, good), env=env)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    # The sender's file name never leaves the process: a content-derived reference does.
    assert [r["input"]["file_name"] for r in lines] == [published_name(p) for p in good]
    validator = jsonschema.Draft202012Validator(load_schema("result-v1"))
    for result in lines:
        validator.validate(result)
    bad = tmp_path / "bad.dcm"
    bad.write_text("hello")
    out = run_cli("process", str(good[0]), str(bad), env=env)
    assert out.returncode == 1
    assert len(out.stdout.splitlines()) == 1
    error = json.loads(out.stderr.strip().splitlines()[-1])
    assert error["code"] == "not_an_image" and "bad.dcm" in error["error"]
