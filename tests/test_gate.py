"""The release gate over real manifests: the bundled model, and copies of it made worse one way each."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from cdk.config import load_config
from cdk.gate import evaluate_gate
from cdk.release import main

THRESHOLDS = load_config(None).gate


@pytest.fixture()
def manifest(default_bundle: Path) -> dict[str, Any]:
    return json.loads((default_bundle / "manifest.json").read_text(encoding="utf-8"))


def _failed(verdict: Any) -> list[str]:
    return [check.name for check in verdict.failed]


def test_the_bundled_model_passes_alone_and_against_itself(manifest: dict[str, Any]) -> None:
    assert evaluate_gate(manifest, THRESHOLDS).passed
    verdict = evaluate_gate(manifest, THRESHOLDS, production=manifest)
    assert verdict.passed and len(verdict.checks) == 7


def test_the_keras_bundle_passes_against_the_pytorch_one(
    manifest: dict[str, Any], keras_bundle: Path
) -> None:
    """Issue 29: the Keras route's bundle passes the release gate against production, same policy."""
    keras = json.loads((keras_bundle / "manifest.json").read_text(encoding="utf-8"))
    verdict = evaluate_gate(keras, THRESHOLDS, production=manifest)
    assert verdict.passed, [(c.name, c.detail) for c in verdict.failed]
    assert len(verdict.checks) == 7  # non-inferiority included: the same official test split
    assert (
        keras["training"]["framework"] == "keras"
        and manifest["training"].get("framework", "pytorch") == "pytorch"
    )
    assert keras["metrics"]["test"]["split"] == manifest["metrics"]["test"]["split"]


@pytest.mark.parametrize(
    ("edit", "failing"),
    [
        (lambda m: m["metrics"]["test"].update(auc_ci95=[0.90, 0.95]), "AUC 95 % CI lower bound"),
        (lambda m: m["metrics"]["test"].update(sensitivity=0.90), "sensitivity at the operating point"),
        (lambda m: m["metrics"]["test"].update(specificity=0.60), "specificity at the operating point"),
        (
            lambda m: m["metrics"]["test"].update(fp32_auc=m["metrics"]["test"]["auc"] + 0.02),
            "INT8 AUC loss against FP32",
        ),
        (lambda m: m["metrics"]["test"].pop("fp32_auc"), "INT8 AUC loss against FP32"),  # not measured
        (lambda m: m["calibration"].update(test_ece_10=0.35), "test ECE (10 bins)"),
        (lambda m: m.pop("conformance"), "conformance reference set"),
    ],
)
def test_each_shortfall_fails_its_own_check(manifest: dict[str, Any], edit: Any, failing: str) -> None:
    candidate = copy.deepcopy(manifest)
    edit(candidate)
    assert _failed(evaluate_gate(candidate, THRESHOLDS)) == [failing]


def test_non_inferiority_needs_the_same_split_and_a_close_auc(manifest: dict[str, Any]) -> None:
    better = copy.deepcopy(manifest)
    better["metrics"]["test"]["auc"] = (
        manifest["metrics"]["test"]["auc"] + THRESHOLDS.non_inferiority_margin + 0.001
    )
    verdict = evaluate_gate(manifest, THRESHOLDS, production=better)
    assert _failed(verdict) == ["non-inferiority to production"]
    other_split = copy.deepcopy(manifest)
    other_split["metrics"]["test"]["split"] = "a hospital's own test set"
    verdict = evaluate_gate(manifest, THRESHOLDS, production=other_split)
    assert "not comparable" in verdict.failed[0].detail


def test_gate_command_exits_by_verdict(
    default_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["gate", "--bundle", str(default_bundle)]) == 0
    assert "gate passed" in capsys.readouterr().out
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps({"Gate": {"MinAucLowerCi": 0.99}}))
    assert main(["gate", "--bundle", str(default_bundle), "--config", str(strict)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  AUC 95 % CI lower bound" in out and "needs >= 0.99" in out
