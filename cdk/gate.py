"""The evaluation gate: may this candidate bundle replace the model in production?

One pure function over two manifests (the candidate's and, when there is
one, production's) and the stack's :class:`~cdk.config.GateThresholds`, so
the release command (``python -m cdk.release gate``) and the release
pipeline decide alike. Every check names its value and its limit:

* AUC: the lower bound of the test AUC's 95 % CI, not the point estimate;
* sensitivity and specificity at the validated operating point;
* the INT8 model's test AUC against its FP32 model's (quantization loss);
* calibration: test ECE (10 bins);
* a conformance reference set is present (devices check it at every load);
* non-inferiority: the candidate's test AUC may be at most the margin below
  production's, on the same test split (different splits are not comparable
  and fail the gate).

A missing number fails its check: a model that was not measured is not
released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import GateThresholds

__all__ = ["GateCheck", "GateVerdict", "evaluate_gate"]


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateVerdict:
    candidate: str
    production: str | None
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[GateCheck]:
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "production": self.production,
            "passed": self.passed,
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks],
        }


def _at_least(name: str, value: float | None, limit: float) -> GateCheck:
    if value is None:
        return GateCheck(name, False, f"not recorded in the manifest (needs >= {limit})")
    return GateCheck(name, value >= limit, f"{value:.4f} (needs >= {limit})")


def _at_most(name: str, value: float | None, limit: float) -> GateCheck:
    if value is None:
        return GateCheck(name, False, f"not recorded in the manifest (needs <= {limit})")
    return GateCheck(name, value <= limit, f"{value:.4f} (needs <= {limit})")


def _label(manifest: dict[str, Any]) -> str:
    return f"{manifest.get('name')} {manifest.get('version')}"


def evaluate_gate(
    candidate: dict[str, Any], thresholds: GateThresholds, production: dict[str, Any] | None = None
) -> GateVerdict:
    """Check ``candidate`` (a bundle manifest) against ``thresholds`` and ``production``'s manifest."""
    test = candidate.get("metrics", {}).get("test", {})
    ci = test.get("auc_ci95") or [None]
    drop = test["fp32_auc"] - test["auc"] if "fp32_auc" in test and "auc" in test else None
    checks = [
        _at_least("AUC 95 % CI lower bound", ci[0], thresholds.min_auc_lower_ci),
        _at_least("sensitivity at the operating point", test.get("sensitivity"), thresholds.min_sensitivity),
        _at_least("specificity at the operating point", test.get("specificity"), thresholds.min_specificity),
        _at_most("INT8 AUC loss against FP32", drop, thresholds.max_int8_auc_drop),
        _at_most(
            "test ECE (10 bins)", candidate.get("calibration", {}).get("test_ece_10"), thresholds.max_ece
        ),
    ]
    conformance = candidate.get("conformance")
    checks.append(
        GateCheck(
            "conformance reference set",
            bool(conformance and conformance.get("images", 0) >= 8),
            f"{conformance.get('images')} reference images, |p - p_fp32| <= {conformance.get('max_abs_diff')}"
            if conformance
            else "missing: devices could not check their answers at load",
        )
    )
    if production is not None:
        prod_test = production.get("metrics", {}).get("test", {})
        if prod_test.get("split") != test.get("split"):
            checks.append(
                GateCheck(
                    "non-inferiority to production",
                    False,
                    f"not comparable: candidate scored on {test.get('split')!r}, production on "
                    f"{prod_test.get('split')!r}",
                )
            )
        elif "auc" not in prod_test or "auc" not in test:
            checks.append(GateCheck("non-inferiority to production", False, "a test AUC is not recorded"))
        else:
            floor = prod_test["auc"] - thresholds.non_inferiority_margin
            checks.append(
                GateCheck(
                    "non-inferiority to production",
                    test["auc"] >= floor,
                    f"AUC {test['auc']:.4f} vs production {_label(production)} {prod_test['auc']:.4f} "
                    f"(needs >= {floor:.4f}, margin {thresholds.non_inferiority_margin})",
                )
            )
    return GateVerdict(_label(candidate), _label(production) if production else None, tuple(checks))
