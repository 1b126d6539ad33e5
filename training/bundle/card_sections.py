"""The model card's sections that packaging adds once the bundle's files exist.

Which files ship and how each was quantized, the training issue's targets
(Kermany bundles), and the conformance reference set: each needs the run's
or the bundle's files, not just the manifest, so they are rendered apart
from the card's body (:mod:`training.bundle.model_card`) and spliced in before
its Limitations section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..export.onnx_export import RECIPES
from ..run_files import EVALUATION_NAME, INT8_NAME, TEST_PREDICTIONS, TFLITE_NAME
from .model_card import _pct

__all__ = ["TARGETS", "conformance_text", "files_section", "targets_section"]

#: The training issue's targets on the official Kermany test split, for the INT8 model the edge runs.
TARGETS = {
    "auc": 0.975,
    "accuracy": 0.935,
    "sensitivity": 0.95,
    "at_specificity": 0.90,
    "max_auc_drop": 0.005,
    "max_int8_mb": 5.0,
}


def conformance_text(section: dict[str, Any]) -> str:
    """Markdown: the reference set every box checks at load, its tolerances and where it came from."""
    build = section["build"]
    rows = "\n".join(
        f"| `{name}` | {b['max_abs_diff']:.4f} | {b['mean_abs_diff']:.4f} | `{b['worst_image']}` |"
        for name, b in build["backends"].items()
    )
    cpu = build["cpu"]
    return f"""
## Conformance check (on every box, at every load)

The bundle carries `{section["file"]}`: {section["images"]} reference images with the FP32 model's
probabilities and each backend's output where this bundle was built. Whenever the runtime loads
this model it runs them on the selected backend on that box's CPU and refuses the model, keeping
the previous one, if an output moves more than **{section["max_drift"]}** from the build
machine's, differs from FP32 by more than **{section["max_abs_diff"]}**, or a decision at the
operating point changes. `edge-runtime model verify` prints the table.
Rule: {section["tolerance_rule"]}.

Measured where this bundle was built ({cpu["model"]}, INT8 features: {", ".join(cpu["int8_features"])}):

| backend | max \\|p - p_fp32\\| | mean | worst image |
|---|---|---|---|
{rows}

{_heat_text(section)}
Reference images: {section["source"]}
"""


def _heat_text(section: dict[str, Any]) -> str:
    """The heat-map part of the conformance text (empty when the set has no reference maps)."""
    heat = section.get("build", {}).get("heatmaps")
    if not heat:
        return ""
    rows = "\n".join(
        f"| `{name}` | {h['max']:.4f} | {h['mean']:.4f} | `{h['worst_image']}` |" for name, h in heat.items()
    )
    grid = "x".join(str(n) for n in section["build"].get("heatmap_grid", []))
    return f"""
The heat-map (class-activation map, output `cam`: the classifier's weights applied at each cell of
the last convolutional features, a {grid} grid here, computed in the same run as the probability;
the device upsamples it onto the image) of every reference image is checked from the same
run: its positive-class map as drawn (scaled to [0, 1]) may move at most
**{section["heatmap_max_drift"]}** from the build machine's and differ from FP32 by at most
**{section["heatmap_max_abs_diff"]}**. Measured here (max |difference| from the FP32 map as drawn):

| backend | max | mean | worst image |
|---|---|---|---|
{rows}
"""


def targets_section(run: Path, evaluation: dict[str, Any], int8_bytes: int) -> str:
    """Markdown: which of the training targets the INT8 model meets on the official Kermany test split.

    Anchors: Kermany et al., Cell 2018 (AUC 0.968, accuracy 92.8 %); MedMNIST v2
    ResNet-50 at 224 px on the same 624 test images (AUC 0.962, accuracy 88.4 %).
    """
    import numpy as np

    from ..evaluate.metrics import roc_auc, sensitivity_at_specificity

    test = evaluation["test"]["int8"]
    fp32_auc = evaluation["test"]["reference"]["fp32_at_threshold"]["auc"]
    rows = [
        (f"AUC >= {TARGETS['auc']}", test["auc"] >= TARGETS["auc"], f"{test['auc']:.4f}"),
        (
            f"accuracy >= {_pct(TARGETS['accuracy'])} at the operating threshold",
            test["accuracy"] >= TARGETS["accuracy"],
            _pct(test["accuracy"]),
        ),
    ]
    predictions = run / TEST_PREDICTIONS
    if predictions.is_file():
        with np.load(predictions) as saved:
            y, p = saved["y"], saved["int8"]
        sens, spec = sensitivity_at_specificity(y, p, TARGETS["at_specificity"])
        if abs(roc_auc(y, p) - test["auc"]) >= 1e-4:
            raise ValueError(f"{predictions} does not match {EVALUATION_NAME}; re-run 'evaluate'.")
        rows.append(
            (
                f"sensitivity >= {_pct(TARGETS['sensitivity'])} at specificity >= "
                f"{_pct(TARGETS['at_specificity'])} (best point on the test ROC curve)",
                sens >= TARGETS["sensitivity"],
                f"{_pct(sens)} at specificity {_pct(spec)}",
            )
        )
    drop = fp32_auc - test["auc"]
    rows.append(
        (
            f"INT8 vs FP32 AUC drop <= {TARGETS['max_auc_drop']}",
            drop <= TARGETS["max_auc_drop"],
            f"{drop:+.4f}",
        )
    )
    mb = int8_bytes / 1e6
    rows.append(
        (f"INT8 ONNX <= {TARGETS['max_int8_mb']:.0f} MB", mb <= TARGETS["max_int8_mb"], f"{mb:.2f} MB")
    )
    table = "\n".join(f"| {text} | {value} | {'met' if ok else '**missed**'} |" for text, ok, value in rows)
    met = sum(ok for _, ok, _ in rows)
    missed = [text.split(" >=")[0].split(" <=")[0] for text, ok, _ in rows if not ok]
    missed_text = f" and misses {len(missed)}: {', '.join(missed)}." if missed else "."
    return f"""
## Targets (official Kermany test split, INT8 model)

This model meets {met} of the {len(rows)} targets set for it{missed_text}

| target | this model | |
|---|---|---|
{table}

Anchors: Kermany et al. (Cell 2018) AUC 0.968, accuracy 92.8 %; MedMNIST v2 ResNet-50 at 224 px
on the same 624 test images AUC 0.962, accuracy 88.4 %. Reproduce the numbers with
`python -m benchmarks.bench_backends` (both INT8 backends, scored from the published results).
"""


def files_section(manifest: dict[str, Any], tflite: dict[str, Any] | None) -> str:
    """Markdown: the model files in the bundle, per backend, and how the TFLite one agrees."""
    label = manifest["artifacts"][0]["quantization"]
    recipe = next((r for name, r in RECIPES.items() if label.endswith(f"-{name}")), None)
    how = f"{recipe.summary}; " if recipe else ""
    rows = [
        f"| `{INT8_NAME}` | `onnxruntime` (default) | `{label}`: static, QDQ, per-channel; {how}"
        "calibrated on training images; classifier + softmax kept FP32"
        + (
            "; heat-map output `cam` (its 1x1 convolution kept FP32)"
            if manifest["artifacts"][0].get("heatmap")
            else ""
        )
        + " |"
    ]
    text = ""
    if tflite is not None:
        rows.append(
            f"| `{TFLITE_NAME}` | `litert` | {tflite['tool']} (INT8 weights and "
            f"activations, calibrated on {tflite['calibration_images']} training images); classifier + "
            "softmax kept float"
            + (
                "; heat-map output (its 1x1 convolution kept float)"
                if manifest["artifacts"][-1].get("heatmap")
                else "; **no heat-map output**"
            )
            + " |"
        )
        agree = tflite["agreement"]
        same = _pct(agree["decision_agreement"])
        text = (
            f"\nBoth come from the same trained model. On the {tflite['validation_images']} validation "
            f"images the LiteRT model takes {tflite['reference']}'s decision at the threshold on {same} of "
            f"images (max |delta p| {agree['max_abs_diff']:.3f}). Export: {tflite['how']}.\n"
        )
    table = "\n".join(rows)
    return f"""
## Model files

| file | backend (`Model.Backend`) | quantization |
|---|---|---|
{table}
{text}"""
