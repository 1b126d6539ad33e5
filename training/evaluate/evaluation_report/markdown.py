"""The Markdown text of the report, from the numbers :mod:`.scores` computed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..metrics import (
    wilson_interval,
)
from .common import METRICS_NAME, NOT_FOR_DIAGNOSTIC_USE, PREDICTIONS_NAME, REPORT_NAME
from .scores import ModelResult

if TYPE_CHECKING:
    pass


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
