"""The five PNG figures (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..metrics import (
    precision_recall_curve,
    roc_curve,
)
from .common import _COLOURS, _LOGIT_EPS
from .scores import ModelResult

if TYPE_CHECKING:
    pass


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
