"""`edge-runtime sample`: the quick start's scans are real, valid, and get the answer the card promises."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.bundle import default_bundle_path

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inbox")
    done = _cli("sample", str(folder))
    assert done.returncode == 0, done.stderr
    return folder


def test_sample_writes_a_dicom_and_a_png_and_says_what_to_expect(samples: Path) -> None:
    names = sorted(p.name for p in samples.iterdir())
    assert names == ["sample-NORMAL.png", "sample-PNEUMONIA.dcm"]  # no .part left behind
    done = _cli("sample", str(samples))  # again: overwrites, same files
    assert done.returncode == 0
    assert "sample-PNEUMONIA.dcm" in done.stdout and "PNEUMONIA" in done.stdout
    assert "expect" in done.stdout.lower()


def test_the_samples_get_the_answer_the_build_machine_recorded(samples: Path) -> None:
    with np.load(default_bundle_path() / "conformance.npz") as refs:
        expected = {float(p) for p in refs["expected_onnxruntime"]}
    done = _cli("process", *(str(p) for p in sorted(samples.iterdir())))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    by_kind = {r["input"]["kind"]: r for r in results}
    assert by_kind["dicom"]["decision"]["label"] == "PNEUMONIA"
    assert by_kind["image"]["decision"]["label"] == "NORMAL"
    for result in results:
        p = result["findings"][0]["probability"]
        assert min(abs(p - e) for e in expected) < 1e-3, (result["input"]["kind"], p)
    # The made-up patient is the model's population and a chest CR: inside its intended use.
    assert by_kind["dicom"]["input"]["modality"] == "CR"
    assert by_kind["dicom"]["input"]["body_part_examined"] == "CHEST"


def test_the_sample_dicom_is_a_valid_cr_image(samples: Path) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dicom3tools' dciodvfy is not installed (apt-get install dicom3tools; .ci/setup does)")
    done = subprocess.run(
        [dciodvfy, str(samples / "sample-PNEUMONIA.dcm")], capture_output=True, text=True, check=False
    )
    report = done.stdout + done.stderr
    assert "CRImage" in report
    assert "Error" not in report, report
