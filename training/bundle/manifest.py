"""The bundle's ``manifest.json`` as a dict, from a finished run's summaries.

The manifest is the contract the edge reads (labels, input, preprocessing,
threshold, file hashes). :func:`build_manifest` is the one place its content
is decided, apart from what packaging adds once the files exist (artifacts
of optional routes, calibration, conformance); what the data were and how
to describe them (:class:`DataCard`) lives here too, since the manifest's
``training.data`` and ``intended_use`` come from it and the model card
(:mod:`training.bundle.model_card`) repeats them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.preprocess import PreprocessSpec

from ..data.datasets import FOLDERS, NIH_SUBSET, NPZ
from ..evaluate.metrics import expected_calibration_error
from ..evaluate.scoring import INPUT_NAME, OUTPUT_NAME, run_head
from ..export.onnx_export import RECIPES
from ..run_files import CALIBRATION_NAME, INT8_NAME, TEST_PREDICTIONS

__all__ = [
    "BUNDLE_NAME",
    "DataCard",
    "build_manifest",
    "calibration_section",
    "data_card",
    "decile_histogram",
    "monitoring_section",
    "ood_section",
]

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
        age_years: ``intended_use.age_years`` (inclusive, years), None where the data do not say.
        age_reason: Why that range, for the card.
    """

    key: str
    title: str
    citation: str
    license: str
    population: str
    task: str
    short: str
    age_years: tuple[float, float] | None = None
    age_reason: str = ""


#: Kermany et al. imaged children aged 1-5 years at Guangzhou Women and Children's Medical
#: Center. The range the model is for is wider than that and narrower than "any child": the
#: anatomy it learned (thymus, heart size, rib and diaphragm shape, proportions of a small
#: chest) is a young child's, and it changes through childhood towards the adult chest.
KERMANY_AGES = (0.0, 10.0)
KERMANY_AGE_REASON = (
    "the training images are of children aged 1-5 years (Kermany et al. 2018); 0-10 years keeps "
    "the check to paediatric anatomy (thymus, cardiothoracic proportions, rib and diaphragm shape "
    "of a small chest) without refusing infants and school-age children outright, while "
    "adolescents and adults, whose chests look different to the model, are outside"
)


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
            KERMANY_AGES,
            KERMANY_AGE_REASON,
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
            KERMANY_AGES,
            KERMANY_AGE_REASON,
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


def _framework(train_summary: dict[str, Any]) -> str:
    """``pytorch`` or ``keras``: which route trained the model (``train_summary.json``)."""
    return "keras" if train_summary.get("framework") == "keras" else "pytorch"


def _bundle_name(card: DataCard, dataset_name: str, framework: str = "pytorch") -> str:
    """The model's name; a Keras-trained model's ends in ``-keras``, so results say which route made it."""
    if card.key == "kermany":
        base = BUNDLE_NAME
    else:
        base = re.sub(r"[^a-z0-9]+", "-", dataset_name.lower()).strip("-") + "-cxr"
    return base if framework == "pytorch" else f"{base}-{framework}"


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
    if export_summary.get("heatmap"):
        artifact["heatmap"] = True
    if export_summary.get("features"):
        artifact["features"] = True
    return artifact


def _output(export_summary: dict[str, Any], activation: str) -> dict[str, Any]:
    """The manifest's ``output``: the probabilities, and the heat-map output if the export has one."""
    output: dict[str, Any] = {"name": OUTPUT_NAME, "activation": activation}
    heatmap = export_summary.get("heatmap")
    if heatmap:
        output["heatmap"] = {"name": heatmap["name"], "kind": heatmap["kind"]}
    features = export_summary.get("features")
    if features:
        output["features"] = {
            "name": features["name"],
            "layers": list(features["layers"]),
            "dims": [int(d) for d in features["dims"]],
        }
    return output


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
    # The same head the run's models were scored with before this manifest existed.
    head = run_head(split)
    classes = list(head.labels)
    positive = head.positive_label
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
        "name": _bundle_name(card, str((split or {}).get("name", "")), _framework(train_summary)),
        "version": version,
        "description": description,
        "labels": classes,
        "positive_label": positive,
        "artifacts": [_onnx_artifact(export_summary)],
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", *spec.sample_shape],
            "dtype": spec.dtype,
            "layout": spec.layout,
        },
        "output": _output(export_summary, head.activation),
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
            **({"age_years": list(card.age_years)} if card.age_years is not None else {}),
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
            "framework": _framework(train_summary),
            "wall_clock_s": round(train_summary["seconds"]["total"], 1),
            "hardware": f"{train_summary['environment']['threads']} CPU threads, "
            + (
                train_summary["environment"]["framework"]
                if "framework" in train_summary["environment"]
                else f"torch {train_summary['environment']['torch']}"
            ),
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


def calibration_section(run: Path) -> dict[str, Any] | None:
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
    predictions = run / TEST_PREDICTIONS
    if predictions.is_file():
        with np.load(predictions) as saved:
            out["test_ece_10"] = round(expected_calibration_error(saved["y"], saved["int8"], 10), 4)
    return out


def ood_section(run: Path) -> dict[str, Any] | None:
    """``intended_use.ood`` from the ``ood`` stage's summary (None: the run has no fitted check)."""
    from ..evaluate.ood import OOD_SUMMARY

    path = run / OOD_SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return {
        "method": summary["method"],
        "file": summary["file"],
        "threshold": summary["threshold"],
        "rule": "outside the intended use when the score is above threshold",
        "quantile": summary["quantile"],
        "threshold_rule": summary["threshold_rule"],
        "validation_outside_share": summary["validation_outside_share"],
        "fitted_on": summary["fitted_on"],
        "covariance": summary["covariance"],
        "layers": summary["layers"],
    }


def decile_histogram(values: np.ndarray, low: float, high: float) -> dict[str, list[float]]:
    """Bins at the deciles of ``values`` with open ends closed at ``low``/``high``; shares per bin.

    Equal deciles (ties) are merged, so the edges increase strictly, as the manifest requires.
    """
    values = np.asarray(values, dtype=np.float64)
    low, high = round(float(low), 6), round(float(high), 6)
    deciles = (round(float(q), 6) for q in np.quantile(values, np.linspace(0.1, 0.9, 9)))
    edges = [low, *sorted({q for q in deciles if low < q < high}), high]
    counts, _ = np.histogram(np.clip(values, low, high), bins=np.asarray(edges))
    shares = (counts / max(values.size, 1)).tolist()
    # rounding for the manifest, keeping the sum at 1
    rounded = [round(x, 6) for x in shares]
    rounded[-1] = round(1.0 - sum(rounded[:-1]), 6)
    return {"edges": edges, "shares": rounded}


def monitoring_section(run: Path, threshold: float) -> dict[str, Any] | None:
    """``monitoring.reference``: the validation split as the INT8 model saw it.

    P(positive) deciles (edges 0 and 1 close the open ends), the share at or above the operating
    point, and, where the run has the out-of-distribution check, its score deciles (the ends at
    the validation minimum - 1 and maximum + 1) and the share outside. JPEG/PNG training images
    carry no header, so ``metadata`` is empty (the drift monitor then compares a site with its
    own first window).
    """
    from ..evaluate.ood import OOD_SUMMARY, OOD_VALIDATION
    from ..run_files import VAL_PREDICTIONS

    predictions = run / VAL_PREDICTIONS
    if not predictions.is_file():
        return None
    with np.load(predictions) as saved:
        p = np.asarray(saved["int8"], dtype=np.float64)
    reference: dict[str, Any] = {
        "description": "validation split through the INT8 ONNX model (training package)",
        "images": int(p.size),
        "outside_share": 0.0,
        "positive_share": round(float((p >= threshold).mean()), 6),
        "mean_probability": round(float(p.mean()), 6),
        "probability": decile_histogram(p, 0.0, 1.0),
        "metadata": {},
    }
    if (run / OOD_VALIDATION).is_file() and (run / OOD_SUMMARY).is_file():
        ood_threshold = json.loads((run / OOD_SUMMARY).read_text(encoding="utf-8"))["threshold"]
        with np.load(run / OOD_VALIDATION) as saved:
            scores = np.asarray(saved["scores"], dtype=np.float64)
        reference["outside_share"] = round(float((scores > ood_threshold).mean()), 6)
        reference["ood_score"] = decile_histogram(
            scores, float(scores.min()) - 1.0, float(scores.max()) + 1.0
        )
    return {"reference": reference}
