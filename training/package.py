"""Write the model bundle: ``model.int8.onnx``, ``MODEL_CARD.md``, ``manifest.json``.

The manifest is the contract the edge reads (labels, input, preprocessing,
threshold, file hashes); the model card is for the people who decide
whether to deploy it. Both are generated from the run folder's summaries so
the numbers in them are the numbers the pipeline measured, not retyped.
The bundle is re-read with :func:`edge_runtime.bundle.load_bundle` at the
end, so a bundle the edge would refuse is never left behind silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edge_runtime.bundle import MANIFEST_NAME, load_bundle, write_manifest
from edge_runtime.preprocess import PreprocessSpec

from .data import LABELS
from .export import EXPORT_SUMMARY, INT8_NAME
from .report import EVALUATION_NAME
from .train import SUMMARY_NAME

__all__ = ["BUNDLE_FILES", "MODEL_CARD_NAME", "build_manifest", "package_bundle", "render_model_card"]

MODEL_CARD_NAME = "MODEL_CARD.md"
BUNDLE_FILES = (INT8_NAME, MODEL_CARD_NAME, MANIFEST_NAME)
BUNDLE_NAME = "pneumonia-cxr"
QUANTIZATION = "int8-qdq-static-per-channel"
THRESHOLD_METHOD = "highest threshold with sensitivity >= 0.95 on the patient-disjoint validation split"
DATA_CITATION = (
    "Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and Treatable Diseases "
    "by Image-Based Deep Learning. Cell 172(5):1122-1131, 2018. Data: Kermany D, Zhang K, "
    "Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for "
    "Classification. Mendeley Data v2, doi:10.17632/rscbjbr9sj.2. CC BY 4.0."
)


def _read(run: Path, name: str) -> dict[str, Any]:
    path = run / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the earlier pipeline stages first.")
    return json.loads(path.read_text(encoding="utf-8"))


def _pick(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("auc", "accuracy", "sensitivity", "specificity", "n", "n_positive", "n_negative")
    out = {k: metrics[k] for k in keys if k in metrics}
    if "auc_ci95" in metrics:
        out["auc_ci95"] = metrics["auc_ci95"]
    return out


def build_manifest(
    train_summary: dict[str, Any],
    export_summary: dict[str, Any],
    evaluation: dict[str, Any],
    spec: PreprocessSpec,
    version: str = "0.1.0",
) -> dict[str, Any]:
    """The manifest dict (without ``files``/``format``, which ``write_manifest`` adds)."""
    val = evaluation["validation"]["int8"]
    test = evaluation["test"]["int8"]
    data = train_summary["data"]
    return {
        "name": BUNDLE_NAME,
        "version": version,
        "description": (
            "EfficientNet-Lite0, INT8: P(pneumonia) from a frontal paediatric chest radiograph. "
            "NOT FOR DIAGNOSTIC USE."
        ),
        "labels": list(LABELS),
        "positive_label": "PNEUMONIA",
        "artifacts": [{"file": INT8_NAME, "backend": "onnxruntime", "quantization": QUANTIZATION}],
        "input": {
            "name": "input",
            "shape": ["batch", *spec.sample_shape],
            "dtype": spec.dtype,
            "layout": spec.layout,
        },
        "output": {"name": "probabilities", "activation": "none"},
        "preprocessing": spec.to_dict(),
        "operating_point": {
            "threshold": evaluation["threshold"],
            "rule": "PNEUMONIA when probabilities[PNEUMONIA] >= threshold",
            "method": THRESHOLD_METHOD,
            "validation": {
                "sensitivity": val["sensitivity"],
                "specificity": val["specificity"],
                "auc": val["auc"],
                "n": val["n"],
            },
        },
        "intended_use": {
            "modalities": ["CR", "DX"],
            "body_parts": ["CHEST"],
            "view_positions": ["PA", "AP"],
            "population": "paediatric (1-5 years)",
            "not_for_diagnostic_use": True,
        },
        "training": {
            "data": {
                "name": "Kermany paediatric chest X-ray (Guangzhou), 224 px resize",
                "citation": DATA_CITATION,
                "license": "CC BY 4.0",
            },
            "architecture": train_summary["model"],
            "pretrained": "ImageNet-1k (efficientnet-lite0-57934424.pth)",
            "trainable": train_summary["trainable_blocks"],
            "split": {
                "train": data["train"],
                "validation": data["val"],
                "method": "patient-disjoint, stratified by label, from the official train split",
            },
            "augmented_views_per_train_image": data["augmented_views_per_train_image"],
            "seed": train_summary["config"]["seed"],
            "epochs": {
                "stage1_head": train_summary["config"]["head_epochs"],
                "stage2_planned": train_summary["stage2"]["epochs_planned"],
                "stage2_final_plan": train_summary["stage2"]["epochs_final_plan"],
                "stage2_run": train_summary["stage2"]["epochs_run"],
                "stage2_best": train_summary["stage2"]["best_epoch"],
            },
            "wall_clock_s": round(train_summary["seconds"]["total"], 1),
            "hardware": f"{train_summary['environment']['threads']} CPU threads, "
            f"torch {train_summary['environment']['torch']}",
            "calibration_images": export_summary["calibration_images"],
        },
        "metrics": {
            "validation": {**_pick(val), "model": "int8", "threshold": evaluation["threshold"]},
            "test": {
                **_pick(test),
                "model": "int8",
                "threshold": evaluation["threshold"],
                "split": "official Kermany test split (624 images)",
            },
            "int8_vs_fp32_validation": {
                k: evaluation["validation_agreement"]["int8_vs_fp32"][k]
                for k in ("max_abs_diff", "mean_abs_diff", "decision_agreement")
            },
        },
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _row(name: str, m: dict[str, Any], auc_note: str = "") -> str:
    return (
        f"| {name} | {m['n']} | {m['auc']:.4f}{auc_note} | {_pct(m['accuracy'])} "
        f"| {_pct(m['sensitivity'])} | {_pct(m['specificity'])} |"
    )


def render_model_card(manifest: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """The human-readable model card (Markdown) for a manifest."""
    op = manifest["operating_point"]
    val = manifest["metrics"]["validation"]
    test = manifest["metrics"]["test"]
    tr = manifest["training"]
    agree = manifest["metrics"]["int8_vs_fp32_validation"]
    ref = evaluation["test"]["reference"]["int8_at_0.5"]
    fp32 = evaluation["test"]["reference"]["fp32_at_threshold"]
    ep = tr["epochs"]
    replanned = (
        f" (shortened to {ep['stage2_final_plan']} when epochs ran slower)"
        if ep["stage2_final_plan"] < ep["stage2_planned"]
        else ""
    )
    spec = manifest["preprocessing"]
    lo, hi = test["auc_ci95"]
    split = tr["split"]
    return f"""# Model card: {manifest["name"]} {manifest["version"]}

> **NOT FOR DIAGNOSTIC USE.** A research and engineering demonstrator. It has
> not been cleared by any regulator, was trained on one hospital's paediatric
> images, and must not inform the care of any patient.

## What it is

- **Task:** probability that a frontal chest radiograph of a young child shows
  pneumonia (`labels` = `NORMAL`, `PNEUMONIA`).
- **Architecture:** EfficientNet-Lite0, ImageNet-pretrained; {tr["trainable"]} fine-tuned.
  Exported to ONNX opset 17 with the softmax inside the graph, then INT8 static
  quantization of every convolution ({manifest["artifacts"][0]["quantization"]}, calibrated on
  {tr["calibration_images"]} training images); the 1280x2 classifier and the softmax stay FP32 so
  the probabilities keep full resolution.
- **Input:** `input`, float32 `[batch, 3, {spec["height"]}, {spec["width"]}]` NCHW, built by
  `edge_runtime.preprocess.preprocess` with the spec in `manifest.json`
  (stretch to {spec["height"]}x{spec["width"]} with area interpolation, 8-bit rounding,
  (x - 0.5) / 0.5, grey repeated on 3 channels).
- **Output:** `probabilities`, `[batch, 2]` (already softmaxed; activation `none`).
- **Decision:** {op["rule"]}, threshold **{op["threshold"]:.4f}** = the {op["method"]}.

## Intended use

Triage/demonstration on an edge device: frontal (PA/AP) chest radiographs
(CR, DX) of children aged 1-5 years. `intended_use` in the manifest lists
these so the runtime's intake policy can refuse other studies from DICOM headers.

**Out of scope:** adults and older children, lateral views, other body parts,
CT, any diagnostic or treatment decision, distinguishing bacterial from viral
pneumonia, any other finding (effusion, pneumothorax, tubes, nodules...).

## Data

{DATA_CITATION}

Images from the Guangzhou Women and Children's Medical Center, children aged
1-5. The copy used here was resized to 224x224 by a third party **without
keeping the aspect ratio**; the model therefore expects squashed images, which
is why the preprocessing stretches instead of letterboxing.

- Official train split, divided by patient (no child on both sides, stratified by label):
  train {split["train"]["images"]} images / {split["train"]["patients"]} patients
  ({split["train"]["NORMAL"]} NORMAL, {split["train"]["PNEUMONIA"]} PNEUMONIA), validation
  {split["validation"]["images"]} images / {split["validation"]["patients"]} patients
  ({split["validation"]["NORMAL"]} NORMAL, {split["validation"]["PNEUMONIA"]} PNEUMONIA).
- Official test split: 624 images (234 NORMAL, 390 PNEUMONIA), scored once at the end and
  never used to choose anything.

## Training

Two-stage transfer learning on 2 CPU threads (`python -m training pipeline`):
classifier on frozen embeddings, then the last blocks + head on cached
activations with a class-weighted loss, cosine schedule and early stopping
on validation AUC; {tr["augmented_views_per_train_image"]} augmented view(s) per training image
(small rotation/zoom/shift, gamma/contrast; no flips). Seed {tr["seed"]}. Stage 2 was planned
for {ep["stage2_planned"]} epoch(s) from a timing probe{replanned}, ran {ep["stage2_run"]}, and kept
epoch {ep["stage2_best"]} (best validation AUC). Training took {tr["wall_clock_s"] / 60:.1f} min.

Reproduce with the command below. The stage-2 epoch count comes from a time
budget measured on the machine, so on a slower or busier one add
`--epochs {ep["stage2_final_plan"]} --time-budget-min 120` to plan the same schedule:

```
python -m training pipeline --data ../shared/data/cxr/kermany_pneumonia_224 \\
    --weights ../shared/data/weights/efficientnet-lite0-57934424.pth \\
    --out runs/default --bundle edge_runtime/models/pneumonia-cxr
```

## Metrics (INT8 model, threshold {op["threshold"]:.4f})

| split | n | AUC | accuracy | sensitivity | specificity |
|---|---|---|---|---|---|
{_row("validation (patient-disjoint)", val)}
{_row("official test", test, f" (95 % CI {lo:.4f}-{hi:.4f})")}

For reference only: the FP32 model before quantization has test AUC {fp32["auc"]:.4f}; the INT8
model at a 0.5 threshold has test accuracy {_pct(ref["accuracy"])}, sensitivity
{_pct(ref["sensitivity"])}, specificity {_pct(ref["specificity"])}. The validation AUC is close to
1 and the test AUC lower, so the validation split overstates performance on new
images: quote the test numbers.

INT8 vs FP32 on validation: max |delta p| {agree["max_abs_diff"]:.4f}, mean {agree["mean_abs_diff"]:.4f},
same decision at the threshold for {_pct(agree["decision_agreement"])} of images.

## Limitations

- **Paediatric only, one centre.** Trained and tested on children from one
  Guangzhou hospital; performance on adults, other hospitals, other detectors
  and other post-processing is unknown and likely lower.
- **224 px, squashed.** Fine detail is lost at 224x224, and the training images
  were stretched to a square; letterboxed or cropped inputs differ from them.
- **Labels** are image-level diagnoses from the original study, not verified here;
  the original dataset contains duplicate images, and patient independence between
  its official train and test splits is not guaranteed (170 `personN` numbers of the
  test split also occur in the train split; whether they are the same children is unknown).
- **Threshold** is set for >= 95 % sensitivity on validation; on new data
  sensitivity and specificity will drift, so re-check before relying on them.
- **Probabilities are not calibrated.** The model is over-confident (the operating
  threshold is {op["threshold"]:.4f}, and at 0.5 most test NORMAL images would be called
  PNEUMONIA): read the output as a score to compare with the threshold, not as a risk.
- The test set's class balance (62.5 % pneumonia) is not a clinical prevalence;
  predictive values computed from it do not transfer.
"""


def package_bundle(run_dir: str | Path, bundle_dir: str | Path, version: str = "0.1.0") -> Path:
    """Assemble the bundle folder from a finished run and verify it with the edge loader.

    Only the bundle's own files are replaced; any other file in the folder
    would be hashed into the manifest and shipped, so it is refused instead.
    """
    run = Path(run_dir)
    bundle = Path(bundle_dir)
    train_summary = _read(run, SUMMARY_NAME)
    export_summary = _read(run, EXPORT_SUMMARY)
    evaluation = _read(run, EVALUATION_NAME)
    spec = PreprocessSpec.from_dict(train_summary["config"]["spec"])

    bundle.mkdir(parents=True, exist_ok=True)
    strangers = sorted(p.name for p in bundle.iterdir() if p.name not in BUNDLE_FILES)
    if strangers:
        raise FileExistsError(
            f"{bundle} holds files that are not part of the bundle: {', '.join(strangers)}. "
            "Remove them (every file in the folder is hashed into the manifest)."
        )
    for name in BUNDLE_FILES:
        (bundle / name).unlink(missing_ok=True)
    shutil.copyfile(run / INT8_NAME, bundle / INT8_NAME)
    manifest = build_manifest(train_summary, export_summary, evaluation, spec, version)
    (bundle / MODEL_CARD_NAME).write_text(render_model_card(manifest, evaluation), encoding="utf-8")
    path = write_manifest(bundle, manifest)
    loaded = load_bundle(bundle)
    print(f"bundle {loaded.name} {loaded.version} written to {bundle} ({path.name} verified)")
    return bundle
