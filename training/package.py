"""Write the model bundle: ``model.int8.onnx``, ``MODEL_CARD.md``, ``manifest.json``.

The manifest is the contract the edge reads (labels, input, preprocessing,
threshold, file hashes); the model card is for the people who decide
whether to deploy it. Both are generated from the run folder's summaries so
the numbers in them are the numbers the pipeline measured, not retyped.
What the model is (family, pretraining, input size) and what it was trained
on (dataset, class names, intended population) come from the run too: its
``train_summary.json`` and ``split.json`` (see :mod:`training.datasets`);
the Kermany/EfficientNet-Lite0 text of the default bundle is one case of it.
The bundle is re-read with :func:`edge_runtime.bundle.load_bundle` at the
end, so a bundle the edge would refuse is never left behind silently.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle import MANIFEST_NAME, load_bundle, write_manifest
from edge_runtime.preprocess import PreprocessSpec

from .conformance_set import CONFORMANCE_NAME, build_reference_set, conformance_section, measure_backends
from .datasets import FOLDERS, NIH_SUBSET, NPZ, SPLIT_FILE, read_split, run_spec
from .evaluate import expected_calibration_error
from .export import RECIPES
from .run_files import (
    CALIBRATION_NAME,
    EVALUATION_NAME,
    EXPORT_SUMMARY,
    INT8_NAME,
    SUMMARY_NAME,
    TEST_PREDICTIONS,
    TFLITE_EXPORT_SUMMARY,
    TFLITE_NAME,
)

__all__ = [
    "BUNDLE_FILES",
    "MODEL_CARD_NAME",
    "DataCard",
    "build_manifest",
    "data_card",
    "package_bundle",
    "render_model_card",
]

MODEL_CARD_NAME = "MODEL_CARD.md"
TEST_PREDICTIONS_NAME = TEST_PREDICTIONS
BUNDLE_FILES = (INT8_NAME, TFLITE_NAME, MODEL_CARD_NAME, MANIFEST_NAME, CONFORMANCE_NAME)

#: The training issue's targets on the official Kermany test split, for the INT8 model the edge runs.
TARGETS = {
    "auc": 0.975,
    "accuracy": 0.935,
    "sensitivity": 0.95,
    "at_specificity": 0.90,
    "max_auc_drop": 0.005,
    "max_int8_mb": 5.0,
}
BUNDLE_NAME = "pneumonia-cxr"
QUANTIZATION = "int8-qdq-static-per-channel"
THRESHOLD_METHOD = "highest threshold with sensitivity >= 0.95 on the patient-disjoint validation split"
DATA_CITATION = (
    "Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and Treatable Diseases "
    "by Image-Based Deep Learning. Cell 172(5):1122-1131, 2018. Data: Kermany D, Zhang K, "
    "Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for "
    "Classification. Mendeley Data v2, doi:10.17632/rscbjbr9sj.2. CC BY 4.0."
)
NIH_CITATION = (
    "Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale Chest X-ray "
    "Database and Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax "
    "Diseases. CVPR 2017. Data: NIH Clinical Center ChestX-ray14 (labels: 2020 revision)."
)
MEDMNIST_CITATION = (
    "Yang J, Shi R, Wei D, et al. MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D "
    "biomedical image classification. Scientific Data 10:41, 2023. Derived from: " + DATA_CITATION
)
#: Weights files known to hold ImageNet-1k weights (the card says "ImageNet-pretrained").
_IMAGENET_FILES = ("efficientnet-lite0-57934424.pth",)
_FAMILY_TITLES = {
    "efficientnet-lite0": "EfficientNet-Lite0",
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
    "vgg11_bn": "VGG-11 (batch norm)",
    "vgg16_bn": "VGG-16 (batch norm)",
    "densenet121": "DenseNet-121",
    "mobilenet_v2": "MobileNetV2",
    "mobilenet_v3_small": "MobileNetV3-Small",
}


@dataclass(frozen=True)
class DataCard:
    """What the model card and manifest say about the training data.

    Attributes:
        key: ``kermany``, ``nih``, ``pneumoniamnist`` or ``other``.
        title: ``training.data.name`` in the manifest.
        citation: How to cite the data.
        license: The data's licence.
        population: ``intended_use.population``.
        task: "probability that ... shows <this>" (the card's task line).
        short: The people and images, in a few words (the card's warning box).
    """

    key: str
    title: str
    citation: str
    license: str
    population: str
    task: str
    short: str


def data_card(split: dict[str, Any] | None) -> DataCard:
    """The :class:`DataCard` for a run's ``split.json`` (None or a first-format split: Kermany)."""
    split = split or {}
    kind = split.get("kind", FOLDERS)
    name = str(split.get("name") or Path(str(split.get("data_root", "kermany_pneumonia_224"))).name)
    classes = list(split.get("classes") or ["NORMAL", "PNEUMONIA"])
    if "kind" not in split or (kind == FOLDERS and "kermany" in name.lower()):
        return DataCard(
            "kermany",
            "Kermany paediatric chest X-ray (Guangzhou), 224 px resize",
            DATA_CITATION,
            "CC BY 4.0",
            "paediatric (1-5 years)",
            "a frontal chest radiograph of a young child shows\n  pneumonia",
            "one hospital's paediatric images",
        )
    if kind == NPZ:
        return DataCard(
            "pneumoniamnist",
            "PneumoniaMNIST (MedMNIST v2; Kermany paediatric chest X-ray, 28 px)",
            MEDMNIST_CITATION,
            "CC BY 4.0",
            "paediatric (1-5 years)",
            "a frontal chest radiograph of a young child shows\n  pneumonia",
            "one hospital's paediatric images, shrunk to 28x28 px",
        )
    if kind == NIH_SUBSET or name.lower().startswith("nih"):
        return DataCard(
            "nih",
            f"NIH ChestX-ray14 ({name})",
            NIH_CITATION,
            "NIH ChestX-ray14 terms: public; cite the paper and acknowledge the NIH Clinical Center",
            "adults and children imaged at the NIH Clinical Center (mostly adults)",
            "a frontal chest radiograph shows any of the\n  14 ChestX-ray14 findings "
            f"(`{classes[1]}`) rather than none (`{classes[0]}`)",
            "one hospital's images with text-mined labels",
        )
    return DataCard(
        "other",
        name,
        "not recorded",
        "not recorded; check before distributing",
        "not recorded",
        f"a chest radiograph belongs to `{classes[1]}`\n  rather than `{classes[0]}`",
        "one dataset",
    )


def _family(model: str) -> str:
    return _FAMILY_TITLES.get(model, model)


def _pretrained(weights: str | None) -> str:
    if not weights:
        return "none (random initialisation)"
    name = Path(weights).name
    return f"ImageNet-1k ({name})" if name in _IMAGENET_FILES else f"weights file {name}"


def _bundle_name(card: DataCard, dataset_name: str) -> str:
    if card.key == "kermany":
        return BUNDLE_NAME
    return re.sub(r"[^a-z0-9]+", "-", dataset_name.lower()).strip("-") + "-cxr"


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


def _onnx_artifact(export_summary: dict[str, Any]) -> dict[str, Any]:
    """The ONNX artifact entry: its quantization recipe, and the CPUs it is restricted to, if any."""
    artifact: dict[str, Any] = {
        "file": INT8_NAME,
        "backend": "onnxruntime",
        "quantization": export_summary.get("quantization", QUANTIZATION),
    }
    recipe = RECIPES.get(str(export_summary.get("quantization_recipe")))
    if recipe is not None and recipe.trusted_int8_dot:
        artifact["requires_int8_dot"] = list(recipe.trusted_int8_dot)
    return artifact


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

Reference images: {section["source"]}
"""


def _fp32_auc(evaluation: dict[str, Any]) -> dict[str, float]:
    """The FP32 model's test AUC, when evaluated: the release gate checks INT8 - FP32 from it."""
    reference = evaluation.get("test", {}).get("reference", {}).get("fp32_at_threshold", {})
    return {"fp32_auc": reference["auc"]} if "auc" in reference else {}


def build_manifest(
    train_summary: dict[str, Any],
    export_summary: dict[str, Any],
    evaluation: dict[str, Any],
    spec: PreprocessSpec,
    version: str = "0.1.0",
    split: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest dict (without ``files``/``format``, which ``write_manifest`` adds).

    ``split`` is the run's ``split.json`` (None: the Kermany data of the
    first pipeline); with the summaries it gives the labels, the data and
    the intended use.
    """
    val = evaluation["validation"]["int8"]
    test = evaluation["test"]["int8"]
    data = train_summary["data"]
    card = data_card(split)
    classes = list((split or {}).get("classes") or ["NORMAL", "PNEUMONIA"])
    positive = classes[1]
    family = _family(train_summary["model"])
    weights = train_summary["config"].get("weights")
    if card.key == "kermany":
        description = (
            f"{family}, INT8: P(pneumonia) from a frontal paediatric chest radiograph. "
            "NOT FOR DIAGNOSTIC USE."
        )
        method = "patient-disjoint, stratified by label, from the official train split"
        test_split = f"official Kermany test split ({test['n']} images)"
    else:
        description = (
            f"{family}, INT8, {spec.height}x{spec.width} px input: P({positive}) from a frontal chest "
            f"radiograph ({card.title}). NOT FOR DIAGNOSTIC USE."
        )
        method = str((split or {}).get("val_method", "patient-disjoint, stratified by label"))
        test_split = f"{(split or {}).get('test_method', 'test split')} ({test['n']} images)"
    manifest = {
        "name": _bundle_name(card, str((split or {}).get("name", ""))),
        "version": version,
        "description": description,
        "labels": classes,
        "positive_label": positive,
        "artifacts": [_onnx_artifact(export_summary)],
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
            "rule": f"{positive} when probabilities[{positive}] >= threshold",
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
            "population": card.population,
            "not_for_diagnostic_use": True,
        },
        "training": {
            "data": {
                "name": card.title,
                "citation": card.citation,
                "license": card.license,
            },
            "architecture": train_summary["model"],
            "pretrained": _pretrained(weights),
            "trainable": train_summary["trainable_blocks"],
            "split": {
                "train": data["train"],
                "validation": data["val"],
                "method": method,
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
                "split": test_split,
                **_fp32_auc(evaluation),
            },
            "int8_vs_fp32_validation": {
                k: evaluation["validation_agreement"]["int8_vs_fp32"][k]
                for k in ("max_abs_diff", "mean_abs_diff", "decision_agreement")
            },
        },
    }
    notes = list((split or {}).get("notes") or [])
    if card.key != "kermany" or notes:
        extra = {"dataset": (split or {}).get("name"), "test_split": (split or {}).get("test_method")}
        manifest["training"]["data"].update({k: v for k, v in extra.items() if v})
        if notes:
            manifest["training"]["data"]["notes"] = notes
    return manifest


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _row(name: str, m: dict[str, Any], auc_note: str = "") -> str:
    return (
        f"| {name} | {m['n']} | {m['auc']:.4f}{auc_note} | {_pct(m['accuracy'])} "
        f"| {_pct(m['sensitivity'])} | {_pct(m['specificity'])} |"
    )


def _spec_text(spec: dict[str, Any]) -> str:
    mean = ", ".join(f"{v:g}" for v in spec["mean"])
    std = ", ".join(f"{v:g}" for v in spec["std"])
    rounding = "8-bit rounding" if spec["quantize_8bit"] else "no 8-bit rounding"
    grey = f"grey repeated on {spec['channels']} channels" if spec["channels"] > 1 else "one grey channel"
    return (
        f"({spec['resize']} to {spec['height']}x{spec['width']} with {spec['interpolation']} interpolation, "
        f"{rounding},\n  (x - {mean}) / {std}, {grey})"
    )


def _architecture(manifest: dict[str, Any]) -> str:
    """The card's architecture bullet: family, pretraining, trained part, export and quantization."""
    tr = manifest["training"]
    pretrained = tr["pretrained"]
    if pretrained.startswith("ImageNet"):
        start = "ImageNet-pretrained"
    elif pretrained.startswith("none"):
        start = "randomly initialised (no pretrained weights)"
    else:
        start = f"initialised from {pretrained.removeprefix('weights file ')}"
    head = "the 1280x2 classifier" if tr["architecture"] == "efficientnet-lite0" else "the classifier"
    return f"""- **Architecture:** {_family(tr["architecture"])}, {start}; {tr["trainable"]} fine-tuned.
  Exported to ONNX opset 17 with the softmax inside the graph, then INT8 static
  quantization of every convolution ({manifest["artifacts"][0]["quantization"]}, calibrated on
  {tr["calibration_images"]} training images); {head} and the softmax stay FP32 so
  the probabilities keep full resolution."""


def _reproduce(config: dict[str, Any] | None, spec: dict[str, Any], bundle_dir: str | Path | None) -> str:
    """The ``pipeline`` command line of a run, from its recorded config."""
    config = config or {}
    out = config.get("out_dir")
    parts = [
        f"--data {config.get('data_root', '<data>')}",
        f"--model {config.get('model', '<model>')} --weights {config.get('weights') or 'none'} "
        f"--size {spec['height']}",
        f"--seed {config.get('seed', 2018)} --val-fraction {config.get('val_fraction', 0.15)}",
    ]
    options = _training_options(config)
    if options:
        parts.append(options)
    parts.append(
        f"--out {f'runs/{Path(out).name}' if out else 'runs/<run>'} --bundle {bundle_dir or '<bundle>'}"
    )
    return "python -m training pipeline " + " \\\n    ".join(parts)


_THRESHOLD_NOTE = """The threshold was chosen on
the validation split: quote the test numbers."""
_SATURATION_NOTE = """The validation AUC is close to
1 and the test AUC lower, so the validation split overstates performance on new
images: quote the test numbers."""


def _metrics_text(manifest: dict[str, Any], evaluation: dict[str, Any], test_name: str, note: str) -> str:
    """The model card's metrics table (validation and test, INT8) and the FP32/INT8 comparison."""
    op = manifest["operating_point"]
    val = manifest["metrics"]["validation"]
    test = manifest["metrics"]["test"]
    agree = manifest["metrics"]["int8_vs_fp32_validation"]
    ref = evaluation["test"]["reference"]["int8_at_0.5"]
    fp32 = evaluation["test"]["reference"]["fp32_at_threshold"]
    lo, hi = test["auc_ci95"]
    return f"""## Metrics (INT8 model, threshold {op["threshold"]:.4f})

| split | n | AUC | accuracy | sensitivity | specificity |
|---|---|---|---|---|---|
{_row("validation (patient-disjoint)", val)}
{_row(test_name, test, f" (95 % CI {lo:.4f}-{hi:.4f})")}

For reference only: the FP32 model before quantization has test AUC {fp32["auc"]:.4f}; the INT8
model at a 0.5 threshold has test accuracy {_pct(ref["accuracy"])}, sensitivity
{_pct(ref["sensitivity"])}, specificity {_pct(ref["specificity"])}. {note}

INT8 vs FP32 on validation: max |delta p| {agree["max_abs_diff"]:.4f}, mean {agree["mean_abs_diff"]:.4f},
same decision at the threshold for {_pct(agree["decision_agreement"])} of images."""


def _training_text(
    tr: dict[str, Any],
    config: dict[str, Any] | None,
    spec: dict[str, Any],
    bundle_dir: str | Path | None,
) -> str:
    """The model card's account of the staged training and the command that reproduces it."""
    ep = tr["epochs"]
    replanned = (
        f" (shortened to {ep['stage2_final_plan']} when epochs ran slower)"
        if ep["stage2_final_plan"] < ep["stage2_planned"]
        else ""
    )
    options = _training_options(config or {})
    if config is None or "augmentation" not in config or "--augment mild" in options:
        aug_text = "small rotation/zoom/shift, gamma/contrast; no flips"
    else:
        aug_text = "rotation, zoom with aspect jitter, shift, brightness/contrast/gamma; no flips"
    smoothing = (config or {}).get("label_smoothing", 0.0)
    if smoothing:
        aug_text += f"; label smoothing {smoothing}"
    threads = tr["hardware"].split(" CPU")[0]
    return f"""Two-stage transfer learning on {threads} CPU threads (`python -m training pipeline`):
classifier on frozen embeddings, then the last blocks + head on cached
activations with a class-weighted loss, cosine schedule and early stopping
on validation AUC (near-ties by validation log-loss); {tr["augmented_views_per_train_image"]} augmented
view(s) per training image ({aug_text}). Seed {tr["seed"]}. Stage 2 was planned for
{ep["stage2_planned"]} epoch(s) from a timing probe{replanned}, ran {ep["stage2_run"]}, and kept
epoch {ep["stage2_best"]}. Training took {tr["wall_clock_s"] / 60:.1f} min.

Reproduce with the command below. The stage-2 epoch count comes from a time
budget measured on the machine, so on a slower or busier one add
`--epochs {ep["stage2_final_plan"]} --time-budget-min 120` to plan the same schedule:

```
{_reproduce(config, spec, bundle_dir)}
```"""


#: ``TrainConfig`` field -> (CLI flag, CLI default) for the options a reproduce command must repeat.
_TRAIN_FLAGS = {
    "cut": ("--cut", None),
    "aug_views": ("--aug-views", 1),
    "epochs": ("--epochs", 10),
    "patience": ("--patience", 3),
    "head_epochs": ("--head-epochs", 30),
    "batch_size": ("--batch-size", 32),
    "lr": ("--lr", 3e-4),
    "label_smoothing": ("--label-smoothing", 0.1),
}


def _training_options(config: dict[str, Any]) -> str:
    """The training flags of a recorded config that differ from the CLI's defaults."""
    from .data import MILD_AUGMENTATION

    flags = [
        f"{flag} {config[key]}"
        for key, (flag, default) in _TRAIN_FLAGS.items()
        if key in config and config[key] != default
    ]
    aug = config.get("augmentation")
    if aug is not None:
        mild = {k: v for k, v in MILD_AUGMENTATION.to_dict().items() if k != "hflip"}
        if {k: v for k, v in aug.items() if k != "hflip"} == mild:
            flags.append("--augment mild")
        if aug.get("hflip"):
            flags.append("--hflip")
    if config.get("freeze_bn") is False:
        flags.append("--train-bn")
    return " ".join(flags)


_DATA_TEXT = {
    "nih": (
        "Frontal chest radiographs from the NIH Clinical Center (Bethesda, USA), adults and\n"
        "children, with 14 finding labels text-mined from the radiology reports (not verified\n"
        "by radiologists; expect label noise). The model was trained on normal (`No Finding`)\n"
        "vs abnormal (any of the 14 findings); the findings themselves are not told apart."
    ),
    "pneumoniamnist": (
        "The Kermany paediatric images (Guangzhou Women and Children's Medical Center, children\n"
        "aged 1-5), centre-cropped and shrunk to 28x28 px by MedMNIST. The copy used here has a\n"
        "modified training split: 826 of the official 1 214 normal images are missing."
    ),
    "other": "Source, licence and label quality of these data are not recorded here.",
}
_DATA_LIMITS = {
    "nih": (
        "- **One centre, noisy labels.** NIH Clinical Center images, mostly adults; labels were\n"
        "  text-mined from reports, not verified, and `abnormal` lumps 14 different findings\n"
        "  (some, such as small nodules, barely visible at a small input size)."
    ),
    "pneumoniamnist": (
        "- **Paediatric only, one centre, 28 px.** Almost all detail is lost at 28x28; full-size\n"
        "  films shrunk by the edge differ from the training images. MedMNIST's validation split\n"
        "  may share children with its training split (patient ids are not published)."
    ),
    "other": "- **Unknown provenance.** Check where the data come from before trusting any number here.",
}


def _generic_card(
    manifest: dict[str, Any],
    evaluation: dict[str, Any],
    card: DataCard,
    split: dict[str, Any] | None,
    config: dict[str, Any] | None,
    bundle_dir: str | Path | None,
) -> str:
    """The model card for any run other than the Kermany EfficientNet-Lite0 one."""
    op = manifest["operating_point"]
    test = manifest["metrics"]["test"]
    tr = manifest["training"]
    spec = manifest["preprocessing"]
    inp = manifest["input"]
    shape = ", ".join(str(v) for v in inp["shape"][1:])
    labels = manifest["labels"]
    parts = tr["split"]

    def counts(part: dict[str, Any]) -> str:
        return ", ".join(f"{part.get(name, 0)} {name}" for name in labels)

    notes = "".join(f"\n- {note}." for note in (split or {}).get("notes") or [])
    data_text = _DATA_TEXT.get(card.key, "")
    if card.key == "kermany":
        data_text = (
            "Images from the Guangzhou Women and Children's Medical Center, children aged 1-5,\n"
            "resized to 224x224 by a third party without keeping the aspect ratio."
        )
    limits = _DATA_LIMITS.get(card.key, "")
    if card.key == "kermany":
        limits = (
            "- **Paediatric only, one centre.** Trained and tested on children from one Guangzhou\n"
            "  hospital; performance elsewhere is unknown and likely lower."
        )
    prevalence = test["n_positive"] / test["n"] if test.get("n") else float("nan")
    licence = "" if card.license in card.citation else f" Licence: {card.license}."
    return f"""# Model card: {manifest["name"]} {manifest["version"]}

> **NOT FOR DIAGNOSTIC USE.** A research and engineering demonstrator. It has
> not been cleared by any regulator, was trained on {card.short},
> and must not inform the care of any patient.

## What it is

- **Task:** probability that {card.task} (`labels` = {", ".join(f"`{name}`" for name in labels)}).
{_architecture(manifest)}
- **Input:** `{inp["name"]}`, {inp["dtype"]} `[batch, {shape}]` {spec["layout"]}, built by
  `edge_runtime.preprocess.preprocess` with the spec in `manifest.json`
  {_spec_text(spec)}.
- **Output:** `probabilities`, `[batch, {len(labels)}]` (already softmaxed; activation `none`).
- **Decision:** {op["rule"]}, threshold **{op["threshold"]:.4f}** = the {op["method"]}.

## Intended use

Demonstration on an edge device: frontal (PA/AP) chest radiographs (CR, DX) of the
population the training data come from ({manifest["intended_use"]["population"]}).
`intended_use` in the manifest lists these so the runtime's intake policy can refuse
other studies from DICOM headers.

**Out of scope:** other populations, lateral views, other body parts, CT, any diagnostic
or treatment decision, and any finding the labels `{labels[0]}`/`{labels[1]}` do not describe.

## Data

{tr["data"]["name"]}. {card.citation}{licence}

{data_text}

- Training and validation: train {parts["train"]["images"]} images / {parts["train"]["patients"]} patients
  ({counts(parts["train"])}), validation {parts["validation"]["images"]} images /
  {parts["validation"]["patients"]} patients ({counts(parts["validation"])}); validation: {parts["method"]}.
- Test: {test["split"]}, scored once at the end and never used to choose anything.{notes}

## Training

{_training_text(tr, config, spec, bundle_dir)}

{_metrics_text(manifest, evaluation, "test", _THRESHOLD_NOTE)}

## Limitations

{limits}
- **{spec["height"]}x{spec["width"]} px input.** Detail finer than the input size is lost, and the
  edge resizes its images with the same {spec["interpolation"]} interpolation as training.
- **Threshold** is set for >= 95 % sensitivity on validation; on new data
  sensitivity and specificity will drift, so re-check before relying on them.
- **Probabilities may not be calibrated:** read the output as a score to compare with
  the threshold {op["threshold"]:.4f}, not as a risk.
- The test set's class balance ({_pct(prevalence)} `{labels[1]}`) is not a clinical prevalence;
  predictive values computed from it do not transfer.
"""


def render_model_card(
    manifest: dict[str, Any],
    evaluation: dict[str, Any],
    *,
    split: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    bundle_dir: str | Path | None = None,
) -> str:
    """The human-readable model card (Markdown) for a manifest.

    Args:
        manifest: From :func:`build_manifest`.
        evaluation: The run's ``evaluation.json``.
        split: The run's ``split.json`` (None: the Kermany data).
        config: The run's training config (``train_summary.json``), for the
            reproduce command of a run other than the default one.
        bundle_dir: Where the bundle is written (same use).
    """
    card = data_card(split)
    if card.key != "kermany" or manifest["training"]["architecture"] != "efficientnet-lite0":
        return _generic_card(manifest, evaluation, card, split, config, bundle_dir)
    return _kermany_card(manifest, evaluation, split, config, bundle_dir)


def _kermany_card(
    manifest: dict[str, Any],
    evaluation: dict[str, Any],
    split_record: dict[str, Any] | None,
    config: dict[str, Any] | None = None,
    bundle_dir: str | Path | None = None,
) -> str:
    """The card of the default bundle: EfficientNet-Lite0 on Kermany."""
    op = manifest["operating_point"]
    tr = manifest["training"]
    spec = manifest["preprocessing"]
    split = tr["split"]
    notes = "".join(f"\n- {note}." for note in (split_record or {}).get("notes") or [])
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
  never used to choose anything.{notes}

## Training

{_training_text(tr, config, spec, bundle_dir)}

{_metrics_text(manifest, evaluation, "official test", _SATURATION_NOTE)}

## Limitations

- **Paediatric only, one centre.** Trained and tested on children from one
  Guangzhou hospital; performance on adults, other hospitals, other detectors
  and other post-processing is unknown and likely lower.
- **{spec["height"]} px, squashed.** Fine detail is lost at {spec["height"]}x{spec["width"]}, and the
  training images were stretched to a square; letterboxed or cropped inputs differ from them.
- **Labels** are image-level diagnoses from the original study, not verified here;
  the original dataset contains duplicate images, and patient independence between
  its official train and test splits is not guaranteed (170 `personN` numbers of the
  test split also occur in the train split; whether they are the same children is unknown).
- **Threshold** is set for >= 95 % sensitivity on validation; on new data
  sensitivity and specificity will drift, so re-check before relying on them.
- {_calibration_text(manifest, op["threshold"])}
- The test set's class balance (62.5 % pneumonia) is not a clinical prevalence;
  predictive values computed from it do not transfer.
"""


def _calibration_text(manifest: dict[str, Any], threshold: float) -> str:
    """The card's sentence on what the published probability means."""
    cal = manifest.get("calibration")
    if not cal:
        return (
            f"**Probabilities are not calibrated.** The model is over-confident (the operating "
            f"threshold is {threshold:.4f}): read the output as a score to compare with the threshold, "
            "not as a risk."
        )
    test = cal.get("test_ece_10")
    test_text = f"; on the official test split it is {test:.3f} (INT8), " if test is not None else "; "
    return (
        f"**Probabilities are temperature-scaled** (T = {cal['temperature']:.3f}, fitted on the "
        f"validation split and folded into the classifier of every model file). Validation ECE "
        f"(15 bins) {cal['validation_ece_15']['after']:.3f}{test_text}the test images come from a "
        "later, shifted population, so read a probability as a calibrated score on data like the "
        "training set, and compare it with the threshold."
    )


def targets_section(run: Path, evaluation: dict[str, Any], int8_bytes: int) -> str:
    """Markdown: which of the training targets the INT8 model meets on the official Kermany test split.

    Anchors: Kermany et al., Cell 2018 (AUC 0.968, accuracy 92.8 %); MedMNIST v2
    ResNet-50 at 224 px on the same 624 test images (AUC 0.962, accuracy 88.4 %).
    """
    import numpy as np

    from .evaluate import roc_auc, sensitivity_at_specificity

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
    predictions = run / TEST_PREDICTIONS_NAME
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
        "calibrated on training images; classifier + softmax kept FP32 |"
    ]
    text = ""
    if tflite is not None:
        rows.append(
            f"| `{TFLITE_NAME}` | `litert` | ai-edge-quantizer `{tflite['quantization']}` (INT8 weights and "
            f"activations, calibrated on {tflite['calibration_images']} training images); classifier + "
            "softmax kept float |"
        )
        agree = tflite["int8_vs_torch"]
        same = _pct(agree["decision_agreement"])
        text = (
            f"\nBoth come from the same checkpoint. On the {tflite['validation_images']} validation images "
            f"the LiteRT model takes PyTorch's decision at the threshold on {same} of images "
            f"(max |delta p| {agree['max_abs_diff']:.3f}). Export: `training/tflite_env.sh` (its own "
            "virtual environment: litert-torch and ai-edge-quantizer pin versions that conflict with the "
            "main one).\n"
        )
    table = "\n".join(rows)
    return f"""
## Model files

| file | backend (`Model.Backend`) | quantization |
|---|---|---|
{table}
{text}"""


def _calibration(run: Path) -> dict[str, Any] | None:
    """The run's temperature scaling (``calibration.json``) with the INT8 test ECE, for the manifest."""
    path = run / CALIBRATION_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {
        "method": "temperature scaling",
        "temperature": round(float(record["temperature"]), 6),
        "fitted_on": "validation split",
        "validation_ece_15": {k: round(v, 4) for k, v in record["validation"]["ece_15_bins"].items()},
    }
    predictions = run / TEST_PREDICTIONS_NAME
    if predictions.is_file():
        with np.load(predictions) as saved:
            out["test_ece_10"] = round(expected_calibration_error(saved["y"], saved["int8"], 10), 4)
    return out


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
    split = read_split(run) if (run / SPLIT_FILE).is_file() else None
    spec = run_spec(run)

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
    manifest = build_manifest(train_summary, export_summary, evaluation, spec, version, split)
    calibration = _calibration(run)
    if calibration:
        manifest["calibration"] = calibration
    tflite = _read(run, TFLITE_EXPORT_SUMMARY) if (run / TFLITE_NAME).is_file() else None
    if tflite is not None:
        shutil.copyfile(run / TFLITE_NAME, bundle / TFLITE_NAME)
        manifest["artifacts"].append(
            {"file": TFLITE_NAME, "backend": "litert", "quantization": tflite["quantization"]}
        )
    # The reference set, then each backend measured on it here through the edge's own check;
    # their outputs are stored beside the FP32 references so every box can be held to them.
    refs = build_reference_set(run, spec)
    np.savez_compressed(bundle / CONFORMANCE_NAME, **refs)
    manifest["conformance"] = {
        "file": CONFORMANCE_NAME,
        "max_abs_diff": 1.0,  # provisional, while the backends are measured
        "decision_margin": 1.0,
    }
    write_manifest(bundle, manifest)
    outputs = measure_backends(load_bundle(bundle))
    np.savez_compressed(
        bundle / CONFORMANCE_NAME, **refs, **{f"expected_{name}": p for name, p in outputs.items()}
    )
    card_data = data_card(split)
    credit = (
        f"{len(refs['images'])} images of the training split "
        f"(e.g. {', '.join(map(str, refs['sources'][:3]))}; "
        f"all listed in the file's `sources`), {card_data.title}; {card_data.license}. "
        f"{card_data.citation}"
    )
    manifest["conformance"] = conformance_section(refs, outputs, credit)
    card = render_model_card(
        manifest, evaluation, split=split, config=train_summary["config"], bundle_dir=bundle_dir
    )
    extra = files_section(manifest, tflite)
    if data_card(split).key == "kermany":
        extra += targets_section(run, evaluation, (run / INT8_NAME).stat().st_size)
    extra += conformance_text(manifest["conformance"])
    card = card.replace("\n## Limitations", extra + "\n## Limitations", 1)
    (bundle / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
    path = write_manifest(bundle, manifest)
    loaded = load_bundle(bundle)
    print(f"bundle {loaded.name} {loaded.version} written to {bundle} ({path.name} verified)")
    return bundle
