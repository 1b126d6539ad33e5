"""The final evaluation report: one Markdown file with PNG figures for a model bundle.

``python -m training evaluate-report`` scores the bundle's model (INT8) and,
optionally, the FP32 ONNX it was quantized from, on a chosen split, and
writes into the output folder:

* ``evaluation_report.md`` - header (model, sha256, data, n, date, the
  command that reproduces it), AUC with bootstrap CI, accuracy,
  sensitivity, specificity, PPV/NPV at the manifest's threshold and at 0.5,
  confusion matrices, calibration (ECE and reliability table) and the
  breakdown by pneumonia subtype, FP32 and INT8 side by side;
* ``confusion_matrix.png``, ``roc.png``, ``precision_recall.png``,
  ``reliability.png``, ``score_distribution.png``;
* ``metrics.json`` (every number, unrounded) and ``predictions.csv`` (one
  row per image), so the numbers can be re-derived without re-running models.

Two rules keep the report honest:

* The threshold is **always** the manifest's operating point, chosen on the
  patient-disjoint validation split by the training pipeline. Nothing here
  chooses or tunes anything on the evaluated split; 0.5 is printed for
  reference only.
* Images go through the edge's own path, ``decode_file`` -> ``preprocess``
  with the manifest's spec -> ONNX Runtime, so the numbers are those of the
  model as the device runs it. The bundle is loaded with
  :func:`edge_runtime.bundle.load_bundle`, which verifies its sha256 hashes.

Every metric comes from :mod:`training.evaluate` (pure numpy); this module
only scores images, draws and writes. No torch is needed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import platform
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .evaluate import (
    average_precision,
    binary_metrics,
    bootstrap_auc_ci,
    confusion_matrix,
    expected_calibration_error,
    precision_recall_curve,
    predictive_values,
    reliability_bins,
    roc_curve,
    subgroup_metrics,
    wilson_interval,
)

if TYPE_CHECKING:
    from edge_runtime.bundle import ModelBundle

    from .datasets import Dataset

__all__ = [
    "FIGURES",
    "REPORT_NAME",
    "Case",
    "ModelResult",
    "add_report_parser",
    "build_report",
    "list_cases",
    "predict_cases",
    "run_from_args",
    "summarize",
]

REPORT_NAME = "evaluation_report.md"
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"
FIGURES = {
    "confusion": "confusion_matrix.png",
    "roc": "roc.png",
    "pr": "precision_recall.png",
    "reliability": "reliability.png",
    "scores": "score_distribution.png",
}
DEFAULT_DATA = Path("../shared/data/cxr/kermany_pneumonia_224")
DEFAULT_OUT = Path("runs/report")
DEFAULT_SPLIT_FILE = Path("runs/default/split.json")
SPLITS = ("test", "val")
#: Subgroup order in the report: the two pneumonia subtypes, then the normals.
GROUP_ORDER = ("bacteria", "virus", "unknown", "normal")
NOT_FOR_DIAGNOSTIC_USE = (
    "**NOT FOR DIAGNOSTIC USE.** A research and engineering demonstrator, not cleared by any "
    "regulator; these numbers describe one hospital's paediatric images and must not inform "
    "the care of any patient."
)
_SUBTYPE_IN_NAME = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
_LOGIT_EPS = 1e-7

REPORT_HELP = "write the final Markdown + PNG evaluation report of a bundle (INT8, optionally FP32)"
REPORT_DESCRIPTION = f"""\
Score the bundle's model (and optionally the FP32 ONNX it was quantized from) on
one split through the edge's decode + preprocess path, and write ONE Markdown
report with PNG figures into --out: AUC with a bootstrap 95 % CI, accuracy,
sensitivity, specificity, PPV/NPV at the manifest's threshold (and at 0.5 for
reference), confusion matrix, ROC and precision-recall curves with the operating
point marked, calibration (ECE and reliability diagram), and sensitivity by
pneumonia subtype (bacteria / virus) with specificity on the normals. With
--fp32, both models appear side by side.

The threshold ALWAYS comes from the bundle's manifest (chosen on the
patient-disjoint validation split); nothing is tuned on the evaluated split.
The report quotes the exact command that reproduces it.

Writes {REPORT_NAME}, {METRICS_NAME} (all numbers), {PREDICTIONS_NAME}
(P(pneumonia) per image) and the figures
{", ".join(FIGURES.values())}."""
REPORT_EPILOG = """\
example (the final report on the official test split):
  python -m training evaluate-report --fp32 runs/default/model.fp32.onnx --out runs/report"""


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Case:
    """One evaluated image.

    Attributes:
        path: Image file (a virtual path for an image held in memory).
        relpath: Path relative to the data root (POSIX), as in ``manifest.csv``;
            the item id of :mod:`training.datasets` (``test/17`` in an npz).
        label: 0 = NORMAL, 1 = PNEUMONIA (the dataset's negative and positive class).
        group: ``normal``, ``bacteria``, ``virus`` or ``unknown`` (positive without a subtype).
        sha256: Of the file's bytes (of the decoded pixels for an in-memory
            image), for the report's data fingerprint.
        image: The decoded image for a set held in memory (PneumoniaMNIST), else None.
    """

    path: Path
    relpath: str
    label: int
    group: str
    sha256: str
    image: np.ndarray | None = field(default=None, compare=False, repr=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_data_manifest(root: Path) -> dict[str, dict[str, str]]:
    """``manifest.csv`` rows by path, or ``{}`` when the folder has none (e.g. a test subset)."""
    path = root / "manifest.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def _dataset(data_root: str | Path | None, split: str, split_file: str | Path | None) -> Dataset:
    """The data to report on: the run's recorded split when ``split_file`` is given, else ``data_root``'s."""
    from .datasets import items_from_split, open_dataset, read_split

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if split_file is not None:
        if not Path(split_file).is_file():
            raise FileNotFoundError(
                f"The training run's split file {split_file} does not exist; "
                "pass --split-file runs/<run>/split.json."
            )
        return items_from_split(read_split(split_file), root=data_root)
    if split == "val":
        raise FileNotFoundError(
            "--split val needs the training run's split.json; pass --split-file runs/<run>/split.json."
        )
    return open_dataset(data_root if data_root is not None else DEFAULT_DATA)


def list_cases(data_root: str | Path | None, split: str, split_file: str | Path | None = None) -> list[Case]:
    """The images of ``split`` with labels and subtypes, in the order the training code lists them.

    With ``split_file`` (a training run's ``split.json``), the run's recorded
    ``val`` or ``test`` items (:func:`training.datasets.items_from_split`;
    ``data_root``, if given, is where those data are now). Without it, ``test``
    is the test split of ``data_root`` as :func:`training.datasets.open_dataset`
    makes it (the official ``test/`` folder for Kermany), and ``val`` is
    refused: the validation split the threshold was chosen on only exists
    in a ``split.json``. The pneumonia subtype comes from ``manifest.csv``
    when the data folder has one and from the file name (``personN_bacteria_M``)
    otherwise; a file whose bytes disagree with the manifest's sha256 is
    refused, so a report never silently describes different images than it says.

    Raises:
        ValueError: unknown split, or a subtype/sha256 conflicting with ``manifest.csv``.
        FileNotFoundError: a missing folder, ``split.json`` or image.
    """
    return _cases(_dataset(data_root, split, split_file), split)


def _cases(dataset: Dataset, split: str) -> list[Case]:
    root = dataset.root
    items = dataset.val if split == "val" else dataset.test
    rows = _read_data_manifest(root) if root.is_dir() else {}
    cases = []
    for item in items:
        relpath = dataset.item_id(item)
        if item.image is not None:
            digest = hashlib.sha256(np.ascontiguousarray(item.image).tobytes()).hexdigest()
        elif item.path.is_file():
            digest = _sha256(item.path)
        else:
            raise FileNotFoundError(f"Image {item.path} listed for split {split!r} does not exist.")
        match = _SUBTYPE_IN_NAME.search(item.path.name)
        from_name = match.group(1).lower() if match else ""
        row = rows.get(relpath)
        if row is not None:
            if row.get("sha256") and row["sha256"] != digest:
                raise ValueError(f"{item.path} does not match the sha256 in {root / 'manifest.csv'}.")
            subtype = row.get("pneumonia_subtype", "") or from_name
            if from_name and subtype != from_name:
                raise ValueError(f"{relpath}: manifest subtype {subtype!r} but file name says {from_name!r}.")
        else:
            subtype = from_name
        group = "normal" if item.label == 0 else (subtype or "unknown")
        cases.append(
            Case(
                path=item.path,
                relpath=relpath,
                label=item.label,
                group=group,
                sha256=digest,
                image=item.image,
            )
        )
    return cases


def _split_title(dataset: Dataset, split: str) -> str:
    if split == "val":
        return "patient-disjoint validation split"
    if dataset.kind == "folders" and dataset.classes == ("NORMAL", "PNEUMONIA"):
        return "official Kermany test split"
    return f"{dataset.name} test split ({dataset.test_method})"


def data_fingerprint(cases: Sequence[Case]) -> str:
    """sha256 over the sorted ``relpath sha256`` lines: the same value means the same images."""
    lines = sorted(f"{c.relpath} {c.sha256}\n" for c in cases)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- scoring


def predict_cases(
    model_path: str | Path,
    cases: Sequence[Case],
    bundle: ModelBundle,
    threads: int = 2,
    batch_size: int = 32,
) -> np.ndarray:
    """P(positive) for every case, through the edge's decode, preprocess and ONNX Runtime backend.

    ``bundle`` supplies the preprocessing spec, input name, output activation
    and positive label, so an FP32 file is run exactly like the bundle's INT8
    one (:mod:`training.scoring`). The bundle's own model is loaded as the
    service loads it; a model whose input does not match the manifest is
    refused (:class:`~edge_runtime.errors.ModelBundleError`) rather than fed wrong tensors.
    """
    from edge_runtime.decode import decode_file
    from edge_runtime.preprocess import preprocess

    from .scoring import OutputHead, bundle_scorer, file_scorer

    spec = bundle.preprocessing
    if Path(model_path).resolve() == bundle.artifact("onnxruntime").path.resolve():
        scorer = bundle_scorer(bundle, threads=threads)
    else:
        head = OutputHead.from_bundle(bundle)
        scorer = file_scorer(model_path, spec, head, threads, input_name=bundle.input_name, output_name=None)
    batch = np.empty((batch_size, *spec.sample_shape), dtype=np.float32)
    probs = np.empty(len(cases), dtype=np.float64)
    with scorer:
        for start in range(0, len(cases), batch_size):
            chunk = cases[start : start + batch_size]
            for i, case in enumerate(chunk):
                pixels = case.image if case.image is not None else decode_file(case.path).pixels
                preprocess(pixels, spec, out=batch[i])
            probs[start : start + len(chunk)] = scorer(batch[: len(chunk)], batch_size)
    return probs


@dataclass
class ModelResult:
    """One scored model: its identity, its probabilities and (after :func:`summarize`) metrics."""

    name: str
    file: Path
    sha256: str
    note: str
    p: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


def summarize(
    y: np.ndarray,
    p: np.ndarray,
    groups: Sequence[str],
    threshold: float,
    n_boot: int = 2000,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Every number the report prints for one model, from :mod:`training.evaluate` only.

    ``threshold`` must be the manifest's; 0.5 is added for reference. Kept
    separate from rendering so that tests can compare the Markdown with
    these values.
    """
    lo, hi = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    at = {}
    for key, t in (("threshold", threshold), ("0.5", 0.5)):
        at[key] = {**binary_metrics(y, p, t), **predictive_values(y, p, t)}
        at[key]["confusion_matrix"] = confusion_matrix(y, p, t).tolist()
    subgroups = subgroup_metrics(y, p, groups, threshold)
    for g in subgroups.values():
        correct, n = (g["tp"], g["n_positive"]) if g["n_positive"] else (g["tn"], g["n_negative"])
        g["rate_ci95"] = list(wilson_interval(int(correct), int(n)))
    bins = reliability_bins(y, p, n_bins)
    return {
        "auc": at["threshold"]["auc"],
        "auc_ci95": [lo, hi],
        "bootstrap_resamples": n_boot,
        "bootstrap_seed": seed,
        "average_precision": average_precision(y, p),
        "ece": expected_calibration_error(y, p, n_bins),
        "n_bins": n_bins,
        "reliability": {k: v.tolist() for k, v in bins.items()},
        "at_threshold": at["threshold"],
        "at_0.5": at["0.5"],
        "subgroups": subgroups,
        # A float32 softmax saturates: these cases are tied and no threshold can separate them.
        "n_p_equal_1": {
            "negative": int(np.sum((p >= 1.0) & (y == 0))),
            "positive": int(np.sum((p >= 1.0) & (y == 1))),
        },
    }


# ----------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _op_label(name: str, m: dict[str, Any], what: str) -> str:
    return f"{name} {what}: sens {m['sensitivity']:.3f}, spec {m['specificity']:.3f}"


def plot_roc(models: Sequence[ModelResult], y: np.ndarray, threshold: float, title: str, path: Path) -> None:
    """ROC curves of every model, the manifest operating point (filled) and 0.5 (hollow) marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 7))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    for model, colour in zip(models, _COLOURS, strict=False):
        s = model.summary
        fpr, tpr, _ = roc_curve(y, model.p)
        lo, hi = s["auc_ci95"]
        ax.plot(fpr, tpr, color=colour, lw=2, label=f"{model.name}: AUC {s['auc']:.4f} [{lo:.4f}, {hi:.4f}]")
        m, r = s["at_threshold"], s["at_0.5"]
        ax.plot(
            1 - m["specificity"],
            m["sensitivity"],
            "o",
            ms=10,
            color=colour,
            mec="black",
            label=_op_label(model.name, m, f"at manifest threshold {threshold:.5g}"),
        )
        ax.plot(
            1 - r["specificity"],
            r["sensitivity"],
            "s",
            ms=8,
            mfc="none",
            mec=colour,
            mew=2,
            label=_op_label(model.name, r, "at 0.5 (reference)"),
        )
    # Zoom on the top-left corner, where the curves and operating points crowd together.
    inset = ax.inset_axes((0.42, 0.42, 0.5, 0.33))
    for line in ax.get_lines():
        inset.plot(
            *line.get_data(),
            ls=line.get_linestyle(),
            lw=line.get_linewidth(),
            marker=line.get_marker(),
            ms=line.get_markersize(),
            color=line.get_color(),
            mfc=line.get_markerfacecolor(),
            mec=line.get_markeredgecolor(),
            mew=line.get_markeredgewidth(),
        )
    inset.set(xlim=(0, 0.5), ylim=(0.8, 1.005), title="zoom: FPR 0-0.5, TPR 0.8-1")
    inset.title.set_fontsize(8)
    inset.tick_params(labelsize=7)
    inset.grid(alpha=0.3)
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        xlabel="False positive rate (1 - specificity)",
        ylabel="True positive rate (sensitivity)",
        title=f"ROC curve\n{title}",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="AUC [95 % bootstrap CI]", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pr(models: Sequence[ModelResult], y: np.ndarray, threshold: float, title: str, path: Path) -> None:
    """Precision-recall curves (step-wise, as average precision integrates them), operating points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    prevalence = float(np.mean(y))
    ax.axhline(prevalence, ls=":", color="grey", lw=1, label=f"no skill (prevalence {prevalence:.3f})")
    for model, colour in zip(models, _COLOURS, strict=False):
        s = model.summary
        precision, recall, _ = precision_recall_curve(y, model.p)
        ax.plot(
            np.r_[0.0, recall],
            np.r_[precision[0], precision],
            drawstyle="steps-pre",
            color=colour,
            lw=2,
            label=f"{model.name}: average precision {s['average_precision']:.4f}",
        )
        m, r = s["at_threshold"], s["at_0.5"]
        ax.plot(
            m["sensitivity"],
            m["ppv"],
            "o",
            ms=10,
            color=colour,
            mec="black",
            label=f"{model.name} at manifest threshold {threshold:.5g}: "
            f"recall {m['sensitivity']:.3f}, precision {m['ppv']:.3f}",
        )
        ax.plot(
            r["sensitivity"],
            r["ppv"],
            "s",
            ms=8,
            mfc="none",
            mec=colour,
            mew=2,
            label=f"{model.name} at 0.5 (reference): recall {r['sensitivity']:.3f}, precision {r['ppv']:.3f}",
        )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(max(0.0, prevalence - 0.1), 1.01),
        xlabel="Recall (sensitivity)",
        ylabel="Precision (PPV on this split)",
        title=f"Precision-recall curve\n{title}",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(
    models: Sequence[ModelResult], threshold: float, labels: Sequence[str], title: str, path: Path
) -> None:
    """One heatmap per model at the manifest threshold: counts and the share of each true class."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5.8 * len(models), 5.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        cm = np.asarray(model.summary["at_threshold"]["confusion_matrix"])
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, int(cm.max())))
        for (i, j), count in np.ndenumerate(cm):
            share = count / cm[i].sum() if cm[i].sum() else math.nan
            colour = "white" if count > cm.max() / 2 else "black"
            ax.text(
                j,
                i,
                f"{count}\n({100 * share:.1f} % of {labels[i]})",
                ha="center",
                va="center",
                color=colour,
                fontsize=10,
            )
        ax.set_xticks([0, 1], [f"called {labels[0]}", f"called {labels[1]}"])
        ax.set_yticks([0, 1], [f"true {labels[0]}", f"true {labels[1]}"], rotation=90, va="center")
        ax.set(xlabel="Model call", ylabel="True label", title=f"{model.name} at threshold {threshold:.5g}")
    fig.suptitle(f"Confusion matrix\n{title}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(models: Sequence[ModelResult], title: str, path: Path) -> None:
    """Reliability diagram (observed pneumonia fraction vs mean predicted, per bin) over bin counts."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7.5, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    top.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    n_models = len(models)
    for k, (model, colour) in enumerate(zip(models, _COLOURS, strict=False)):
        s = model.summary
        rel = s["reliability"]
        edges = np.asarray(rel["edges"])
        count = np.asarray(rel["count"])
        filled = count > 0
        mean_p = np.asarray(rel["mean_predicted"], dtype=float)[filled]
        observed = np.asarray(rel["observed_rate"], dtype=float)[filled]
        top.plot(
            mean_p,
            observed,
            "o-",
            color=colour,
            lw=1.5,
            label=f"{model.name}: ECE {s['ece']:.4f} ({s['n_bins']} bins)",
        )
        width = (edges[1] - edges[0]) / (n_models + 1)
        bottom.bar(
            edges[:-1] + width * (k + 0.5),
            np.where(count > 0, count, np.nan),
            width=width,
            align="edge",
            color=colour,
            label=model.name,
        )
    top.set(
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        ylabel="Observed fraction with pneumonia",
        title=f"Reliability diagram (P(pneumonia), equal-width bins)\n{title}",
    )
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=9)
    bottom.set_yscale("log")
    bottom.set(
        xlabel="Predicted P(pneumonia) (bin: mean predicted above, bin range below)",
        ylabel="Images per bin (log)",
    )
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scores(
    models: Sequence[ModelResult],
    y: np.ndarray,
    threshold: float,
    labels: Sequence[str],
    title: str,
    path: Path,
) -> None:
    """Histograms of P(pneumonia) per true class on a logit axis, with the threshold and 0.5.

    A logit axis because an over-confident model puts most scores within
    1e-3 of 0 or 1, where a linear axis shows nothing, and the manifest's
    threshold sits there too. Scores outside the axis (a float32 softmax
    often returns exactly 1.0) are counted in the outermost bins, and the
    count axis is logarithmic so that those bins do not flatten the rest.
    """
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullFormatter

    fig, axes = plt.subplots(len(models), 1, figsize=(8.5, 3.9 * len(models)), squeeze=False)
    edges = 1.0 / (1.0 + np.exp(-np.linspace(-np.log(1 / _LOGIT_EPS - 1), np.log(1 / _LOGIT_EPS - 1), 57)))
    ticks = [1e-6, 1e-4, 1e-2, 0.5, 1 - 1e-2, 1 - 1e-4, 1 - 1e-6]
    tick_labels = ["1e-6", "1e-4", "0.01", "0.5", "0.99", "0.9999", "0.999999"]
    for ax, model in zip(axes[:, 0], models, strict=True):
        clipped = np.clip(model.p, edges[0], edges[-1])
        for label_id, colour in ((0, "tab:green"), (1, "tab:red")):
            mask = y == label_id
            ones = int(np.sum(model.p[mask] >= 1.0))
            ax.hist(
                clipped[mask],
                bins=edges,
                color=colour,
                alpha=0.55,
                label=f"true {labels[label_id]} (n={int(mask.sum())}; {ones} with p = 1.0)",
            )
        ax.axvline(threshold, color="black", lw=1.5, label=f"manifest threshold {threshold:.5g}")
        ax.axvline(0.5, color="black", lw=1, ls="--", label="0.5 (reference)")
        ax.set_xscale("logit")
        ax.set_xlim(edges[0], edges[-1])
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.set_xticks(ticks, tick_labels)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.set(
            xlabel=f"Predicted P(pneumonia), logit scale (outermost bins hold p < {_LOGIT_EPS:g} "
            f"and p > 1 - {_LOGIT_EPS:g})",
            ylabel="Images (log scale)",
            title=f"{model.name}",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Score distribution by true class\n{title}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- markdown


def fmt_rate(k: int | float, n: int | float) -> str:
    """``0.9821 (383/390)``: the rate to 4 decimals and the counts it comes from."""
    k, n = int(k), int(n)
    return f"{k / n:.4f} ({k}/{n})" if n else f"n/a ({k}/{n})"


def fmt_num(value: float) -> str:
    """4 decimals, or ``n/a`` for NaN (an undefined rate)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def fmt_ci(lo: float, hi: float) -> str:
    """``[0.9324, 0.9698]``."""
    return f"[{fmt_num(lo)}, {fmt_num(hi)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _group_title(group: str) -> str:
    return {
        "bacteria": "bacterial pneumonia",
        "virus": "viral pneumonia",
        "unknown": "pneumonia, subtype unknown",
        "normal": "normal",
    }.get(group, group)


def _subgroup_rows(models: Sequence[ModelResult], groups: Sequence[str]) -> list[list[str]]:
    rows = []
    for group in groups:
        g0 = models[0].summary["subgroups"][group]
        positive = bool(g0["n_positive"])
        row = [_group_title(group), "sensitivity" if positive else "specificity", str(g0["n"])]
        for model in models:
            g = model.summary["subgroups"][group]
            k, n = (g["tp"], g["n_positive"]) if positive else (g["tn"], g["n_negative"])
            row.append(f"{fmt_rate(k, n)} {fmt_ci(*g['rate_ci95'])}")
        rows.append(row)
    # The pooled pneumonia row, from the whole-set metrics (= bacteria + virus + unknown).
    m0 = models[0].summary["at_threshold"]
    pooled = ["all pneumonia", "sensitivity", str(m0["n_positive"])]
    for model in models:
        m = model.summary["at_threshold"]
        ci = fmt_ci(*wilson_interval(m["tp"], m["n_positive"]))
        pooled.append(f"{fmt_rate(m['tp'], m['n_positive'])} {ci}")
    rows.insert(len([g for g in groups if g != "normal"]), pooled)
    return rows


def _reliability_rows(models: Sequence[ModelResult]) -> list[list[str]]:
    edges = models[0].summary["reliability"]["edges"]
    rows = []
    for b in range(len(edges) - 1):
        if not any(m.summary["reliability"]["count"][b] for m in models):
            continue
        row = [f"[{edges[b]:.4f}, {edges[b + 1]:.4f}{']' if b == len(edges) - 2 else ')'}"]
        for model in models:
            rel = model.summary["reliability"]
            row += [str(rel["count"][b]), fmt_num(rel["mean_predicted"][b]), fmt_num(rel["observed_rate"][b])]
        rows.append(row)
    return rows


def render_markdown(ctx: dict[str, Any], models: Sequence[ModelResult]) -> str:
    """The report text. ``ctx`` holds the header facts (see :func:`build_report`)."""
    t = ctx["threshold"]
    names = [m.name for m in models]
    both = len(models) > 1
    split_title = ctx["split_title"]
    counts = ctx["group_counts"]
    count_text = ", ".join(f"{counts[g]} {_group_title(g)}" for g in ctx["groups"] if g != "normal")

    header_rows = [
        [
            "model",
            f"{ctx['bundle_name']} {ctx['bundle_version']} (bundle `{ctx['bundle_path']}`, "
            "hashes verified by `load_bundle`)",
        ],
    ]
    for m in models:
        header_rows.append([f"{m.name} file", f"`{m.file}` ({m.note}), sha256 `{m.sha256}`"])
    header_rows += [
        ["data split", f"{split_title}: `{ctx['data_path']}`"],
        ["n", f"{ctx['n']} images: {ctx['n_negative']} NORMAL, {ctx['n_positive']} PNEUMONIA ({count_text})"],
        [
            "data fingerprint",
            f"sha256 `{ctx['data_fingerprint']}` over the sorted `path sha256` lines "
            f"of the evaluated images{ctx['manifest_note']}",
        ],
        ["threshold", f"{t!r} = manifest `operating_point.threshold` ({ctx['threshold_method']})"],
        ["generated", f"{ctx['date']} in {ctx['seconds']:.0f} s"],
        ["code", ctx["code_version"]],
        ["software", ctx["software"]],
    ]

    free_rows = [
        ["AUC", *[fmt_num(m.summary["auc"]) for m in models]],
        ["AUC 95 % CI", *[fmt_ci(*m.summary["auc_ci95"]) for m in models]],
        ["average precision", *[fmt_num(m.summary["average_precision"]) for m in models]],
        [f"ECE ({ctx['n_bins']} bins)", *[fmt_num(m.summary["ece"]) for m in models]],
    ]
    at_header = ["metric"]
    cols: list[dict[str, Any]] = []
    for m in models:
        at_header += [f"{m.name} @ {t:.5g} (manifest)", f"{m.name} @ 0.5 (reference)"]
        cols += [m.summary["at_threshold"], m.summary["at_0.5"]]
    at_rows = [
        ["accuracy", *[fmt_rate(c["tp"] + c["tn"], c["n"]) for c in cols]],
        ["sensitivity", *[fmt_rate(c["tp"], c["n_positive"]) for c in cols]],
        ["specificity", *[fmt_rate(c["tn"], c["n_negative"]) for c in cols]],
        ["PPV", *[fmt_rate(c["tp"], c["tp"] + c["fp"]) for c in cols]],
        ["NPV", *[fmt_rate(c["tn"], c["tn"] + c["fn"]) for c in cols]],
        ["TP / FP / TN / FN", *[f"{c['tp']} / {c['fp']} / {c['tn']} / {c['fn']}" for c in cols]],
    ]

    labels = ctx["labels"]
    confusion_tables = []
    for m in models:
        cm = m.summary["at_threshold"]["confusion_matrix"]
        rows = [[f"true {labels[i]}", str(cm[i][0]), str(cm[i][1]), str(sum(cm[i]))] for i in (0, 1)]
        rows.append(["total", str(cm[0][0] + cm[1][0]), str(cm[0][1] + cm[1][1]), str(ctx["n"])])
        confusion_tables.append(
            _table([f"{m.name} @ {t:.5g}", f"called {labels[0]}", f"called {labels[1]}", "total"], rows)
        )

    rel_header = ["bin"]
    for name in names:
        rel_header += [f"{name} n", f"{name} mean predicted", f"{name} observed"]

    agreement = ""
    if both:
        a, b = models[0], models[1]
        diff = np.abs(a.p - b.p)
        same = (a.p >= t) == (b.p >= t)
        agreement = f"""
## {a.name} vs {b.name} on the same images

| | value |
|---|---|
| same call at the manifest threshold | {fmt_rate(int(same.sum()), same.size)} |
| max \\|Δp\\| | {diff.max():.4g} |
| mean \\|Δp\\| | {diff.mean():.4g} |
| AUC difference ({a.name} - {b.name}) | {a.summary["auc"] - b.summary["auc"]:+.4f} |

Both models are judged at the same manifest threshold, which was chosen on validation from the
{models[0].name} model's probabilities (the model the edge runs); the FP32 model is the
quantization's reference, not a deployment candidate.
"""

    recorded = ctx.get("recorded_test")
    recorded_text = ""
    if recorded:
        recorded_text = (
            f"- The bundle's manifest records, for the same split, AUC {recorded['auc']:.4f}, "
            f"sensitivity {recorded['sensitivity']:.4f}, specificity {recorded['specificity']:.4f} "
            f"(n = {recorded['n']}); this report's {models[0].name} column should agree to rounding.\n"
        )
    split_caveat = (
        "- **This is the split the threshold was chosen on**, so its sensitivity is close to the\n"
        "  target by construction and every number here is optimistic.\n"
        if ctx["split"] == "val"
        else "- The official test split was used only to score, once, at the manifest's fixed threshold;\n"
        "  no model, threshold or setting was chosen on it.\n"
    )
    figures = ctx["figures"]
    saturated = "; ".join(
        f"{m.name} gives P(pneumonia) = 1.0 exactly for "
        f"{m.summary['n_p_equal_1']['negative'] + m.summary['n_p_equal_1']['positive']} images "
        f"({m.summary['n_p_equal_1']['negative']} NORMAL, {m.summary['n_p_equal_1']['positive']} PNEUMONIA)"
        for m in models
    )
    return f"""# Evaluation report: {ctx["bundle_name"]} {ctx["bundle_version"]} on the {split_title}

> {NOT_FOR_DIAGNOSTIC_USE}

{_table(["", ""], header_rows)}

Reproduce (from the repository root; the same data, bundle and seed give the same numbers):

```
{ctx["command"]}
```

## Operating point

The decision threshold is **{t:.6g}** ({t!r}), read from the bundle's `manifest.json`
(`operating_point.threshold`): the {ctx["threshold_method"]}. **It was not tuned on this
split**; nothing in this report chooses a threshold. A case is called PNEUMONIA when
P(pneumonia) >= threshold. The 0.5 columns are for reference only: 0.5 is not the model's
operating point.

## Summary

Threshold-free metrics (AUC 95 % CI: percentile bootstrap over images, {ctx["n_boot"]} resamples,
seed {ctx["seed"]}):

{_table(["threshold-free metric", *names], free_rows)}

At a threshold (rates with the counts they come from):

{_table(at_header, at_rows)}

PPV and NPV depend on the split's prevalence ({ctx["n_positive"]}/{ctx["n"]} =
{ctx["n_positive"] / ctx["n"]:.1%} pneumonia), which is not a clinical prevalence: they do not
transfer to a screening population. Sensitivity and specificity do not depend on it.

## Confusion matrix

At the manifest threshold (rows: true label; columns: model call).

{chr(10).join(t_ + chr(10) for t_ in confusion_tables)}
![Confusion matrix]({figures["confusion"]})

## ROC and precision-recall curves

Filled circle: the manifest operating point; hollow square: 0.5 (reference).

![ROC curve]({figures["roc"]})

![Precision-recall curve]({figures["pr"]})

![Score distribution]({figures["scores"]})

Saturated outputs: {saturated}. Tied cases cannot be separated by any threshold (the AUC counts
their NORMAL/PNEUMONIA pairs as 1/2); with so many scores piled up near 1 (the model is
over-confident), the operating threshold sits at {t:.5g}.

## Calibration

Expected calibration error of P(pneumonia): {ctx["n_bins"]} equal-width bins on [0, 1]; per bin,
the mean predicted P(pneumonia) vs the observed fraction with pneumonia, weighted by the bin's
share of images. {", ".join(f"{m.name}: ECE **{fmt_num(m.summary['ece'])}**" for m in models)}.
A high AUC with a high ECE means the model ranks well but its probability is not a risk:
compare it with the threshold, do not read it as a percentage.

{_table(rel_header, _reliability_rows(models))}

![Reliability diagram]({figures["reliability"]})

## By subtype

At the manifest threshold. Sensitivity for the pneumonia subtypes (from the file names /
`manifest.csv` column `pneumonia_subtype`), specificity for the normals; 95 % Wilson intervals.

{_table(["group", "rate", "n", *names], _subgroup_rows(models, ctx["groups"]))}
{agreement}
## Notes

{split_caveat}{recorded_text}- The Kermany data hold groups of byte-identical images (6 of them inside the
  official test split), and the official test split's patients are not guaranteed to be absent
  from the training split (see `shared/data/PROVENANCE.md`): cases are not fully independent, so
  the intervals understate the uncertainty.
- Images from one paediatric centre (Guangzhou), resized to 224x224 by a third party; nothing here
  says how the model does elsewhere.
- Files: `{REPORT_NAME}` (this report), {", ".join(f"`{f}`" for f in figures.values())},
  `{METRICS_NAME}` (all numbers unrounded), `{PREDICTIONS_NAME}` (P(pneumonia) per image).
"""


# ----------------------------------------------------------------------------- orchestration


def _display(path: Path) -> str:
    """A path as the reader should type it: relative to the working folder when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _code_version() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"git {head}" + (" with uncommitted changes" if dirty else "")


def _software() -> str:
    import matplotlib
    import onnxruntime

    return (
        f"Python {platform.python_version()}, numpy {np.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, matplotlib {matplotlib.__version__}"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def reproduce_command(
    bundle: Path,
    fp32: Path | None,
    data: Path | None,
    split: str,
    split_file: Path | None,
    out: Path,
    n_boot: int,
    seed: int,
    n_bins: int,
) -> str:
    """The CLI line that regenerates the report, every option explicit so defaults cannot drift."""
    argv = ["python", "-m", "training", "evaluate-report", "--bundle", _display(bundle)]
    if fp32 is not None:
        argv += ["--fp32", _display(fp32)]
    if data is not None:
        argv += ["--data", _display(data)]
    argv += ["--split", split]
    if split_file is not None:
        argv += ["--split-file", _display(split_file)]
    argv += ["--out", _display(out), "--bootstrap", str(n_boot), "--seed", str(seed), "--bins", str(n_bins)]
    return shlex.join(argv)


def build_report(
    bundle_dir: str | Path,
    data_root: str | Path | None,
    out_dir: str | Path,
    split: str = "test",
    fp32: str | Path | None = None,
    split_file: str | Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    n_bins: int = 15,
    threads: int = 2,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Score, compute, draw and write the report; returns what ``metrics.json`` holds.

    The bundle's model is always evaluated (it is what the edge runs); the
    FP32 ONNX, when given, is run through the same preprocessing and judged
    at the same manifest threshold. The images are chosen as in :func:`list_cases`.
    """
    from edge_runtime.bundle import load_bundle, sha256_file

    t0 = time.monotonic()
    bundle_path, out = Path(bundle_dir), Path(out_dir)
    data_arg = Path(data_root) if data_root is not None else None
    split_path = Path(split_file) if split_file is not None else None
    bundle = load_bundle(bundle_path)
    threshold = bundle.threshold
    dataset = _dataset(data_arg, split, split_path)
    data_path = dataset.root
    cases = _cases(dataset, split)
    if not cases:
        raise ValueError(f"No images found for split {split!r} under {data_path}.")
    y = np.array([c.label for c in cases], dtype=np.int64)
    groups = [c.group for c in cases]

    artifact = bundle.artifact("onnxruntime")
    quant = artifact.quantization
    models = [
        ModelResult(
            name="INT8" if "int8" in quant.lower() else "bundle",
            file=artifact.path,
            sha256=artifact.sha256,
            note=f"the bundle's model, {quant}",
            p=np.empty(0),
        )
    ]
    if fp32 is not None:
        fp32_path = Path(fp32)
        if not fp32_path.is_file():
            raise FileNotFoundError(f"FP32 model {fp32_path} not found.")
        models.append(
            ModelResult(
                name="FP32",
                file=fp32_path,
                sha256=sha256_file(fp32_path),
                note="FP32 export before quantization; not in the bundle",
                p=np.empty(0),
            )
        )
    for model in models:
        start = time.monotonic()
        print(f"scoring {model.name}: {len(cases)} images from {data_path} ...", file=sys.stderr, flush=True)
        model.p = predict_cases(model.file, cases, bundle, threads=threads, batch_size=batch_size)
        model.summary = summarize(y, model.p, groups, threshold, n_boot=n_boot, seed=seed, n_bins=n_bins)
        print(f"  {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        model.file = Path(_display(model.file))

    out.mkdir(parents=True, exist_ok=True)
    split_title = _split_title(dataset, split)
    title = f"{bundle.name} {bundle.version}, {split_title} (n={len(cases)})\nnot for diagnostic use"
    labels = bundle.labels
    plot_confusion(models, threshold, labels, title, out / FIGURES["confusion"])
    plot_roc(models, y, threshold, title, out / FIGURES["roc"])
    plot_pr(models, y, threshold, title, out / FIGURES["pr"])
    plot_reliability(models, title, out / FIGURES["reliability"])
    plot_scores(models, y, threshold, labels, title, out / FIGURES["scores"])

    counts = Counter(groups)
    present = [g for g in GROUP_ORDER if g in counts] + sorted(set(counts) - set(GROUP_ORDER))
    manifest_rows = _read_data_manifest(data_path) if data_path.is_dir() else {}
    manifest_note = (
        f"; every image matched its sha256 in `manifest.csv` (sha256 "
        f"`{sha256_file(data_path / 'manifest.csv')}`)"
        if manifest_rows
        else ""
    )
    recorded = bundle.manifest.get("metrics", {}).get("test") if split == "test" else None
    ctx: dict[str, Any] = {
        "bundle_name": bundle.name,
        "bundle_version": bundle.version,
        "bundle_path": _display(bundle_path),
        "split": split,
        "split_title": split_title,
        "data_path": (
            _display(data_path / split)
            if split == "test" and dataset.kind == "folders"
            else _display(data_path)
        ),
        "n": len(cases),
        "n_positive": int(y.sum()),
        "n_negative": int(len(y) - y.sum()),
        "group_counts": dict(counts),
        "groups": present,
        "labels": labels,
        "data_fingerprint": data_fingerprint(cases),
        "manifest_note": manifest_note,
        "threshold": threshold,
        "threshold_method": bundle.manifest["operating_point"].get("method", "operating point"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "code_version": _code_version(),
        "software": _software(),
        "command": reproduce_command(
            bundle_path,
            Path(fp32) if fp32 is not None else None,
            data_arg,
            split,
            split_path,
            out,
            n_boot,
            seed,
            n_bins,
        ),
        "n_boot": n_boot,
        "seed": seed,
        "n_bins": n_bins,
        "figures": FIGURES,
        "recorded_test": recorded,
        "seconds": time.monotonic() - t0,
    }
    (out / REPORT_NAME).write_text(render_markdown(ctx, models), encoding="utf-8")
    with open(out / PREDICTIONS_NAME, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group", *[f"p_{m.name.lower()}" for m in models]])
        for i, case in enumerate(cases):
            probs = [repr(float(m.p[i])) for m in models]
            writer.writerow([case.relpath, labels[case.label], case.group, *probs])
    result = {
        **{
            k: ctx[k]
            for k in (
                "bundle_name",
                "bundle_version",
                "split",
                "n",
                "n_positive",
                "n_negative",
                "group_counts",
                "data_fingerprint",
                "threshold",
                "date",
                "code_version",
                "command",
            )
        },
        "models": {m.name: {"file": str(m.file), "sha256": m.sha256, **m.summary} for m in models},
    }
    (out / METRICS_NAME).write_text(json.dumps(_jsonable(result), indent=2) + "\n", encoding="utf-8")
    print(f"report written to {out / REPORT_NAME}", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------- command line


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate-report`` on the ``python -m training`` sub-command parser."""
    from edge_runtime.bundle import default_bundle_path

    p = subparsers.add_parser(
        "evaluate-report",
        help=REPORT_HELP,
        description=REPORT_DESCRIPTION,
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bundle",
        type=Path,
        default=Path(_display(default_bundle_path())),
        help="model bundle folder; its manifest gives the threshold (default: %(default)s)",
    )
    p.add_argument(
        "--fp32",
        type=Path,
        default=None,
        help="optional FP32 ONNX export of the same model (e.g. runs/default/model.fp32.onnx), "
        "reported side by side at the same threshold",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="dataset (any path 'python -m training prepare' reads). --split test: score this "
        "data's test split (the official test/ folder for Kermany); without --data, the test "
        f"split recorded in --split-file, or {DEFAULT_DATA} when that file does not exist. "
        "--split val: where the run's data are now, if they moved",
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="test = the test split (default; the official Kermany test split for the default "
        "model); val = the patient-disjoint validation split of --split-file (the one the "
        "threshold was chosen on)",
    )
    p.add_argument(
        "--split-file",
        type=Path,
        default=DEFAULT_SPLIT_FILE,
        help="training run's split.json: gives the val split, and the test split when --data is "
        "not given (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output folder for the report and figures (default: %(default)s; runs/ is gitignored)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=2000,
        help="bootstrap resamples for the AUC CI (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--bins", type=int, default=15, help="calibration bins for ECE (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=32, help="images per inference call (default: %(default)s)"
    )
    return p


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`build_report` from parsed ``evaluate-report`` arguments."""
    if args.data is not None and not args.data.exists():
        raise SystemExit(f"error: data {args.data} not found; pass --data")
    if args.split == "val" or (args.data is None and args.split_file.is_file()):
        split_file = args.split_file
    else:
        split_file = None
    return build_report(
        args.bundle,
        args.data,
        args.out,
        split=args.split,
        fp32=args.fp32,
        split_file=split_file,
        n_boot=args.bootstrap,
        seed=args.seed,
        n_bins=args.bins,
        threads=args.threads,
        batch_size=args.batch_size,
    )
