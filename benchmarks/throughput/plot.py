"""The figure of a run (``bench_throughput.png``): one panel per part, the targets drawn in.

Apart because matplotlib is optional: without it the run says so and writes no plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.throughput.report import TARGET_COLD_S, TARGET_RSS_MB


def grouped_bars(
    ax: Any, table: dict[str, Any], series: tuple[tuple[str, str], ...]
) -> tuple[Any, list[str]]:
    """One group of bars per input kind (a log scale: kinds differ by orders of magnitude)."""
    keys = list(table)
    xs = np.arange(len(keys))
    for i, (field, label) in enumerate(series):
        ax.bar(xs + (i - (len(series) - 1) / 2) * 0.2, [table[k][field] for k in keys], 0.2, label=label)
    ax.set_xticks(xs, keys, rotation=20, fontsize=8)
    ax.set_yscale("log")
    return xs, keys


def plot(results: dict[str, Any], path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install matplotlib)"
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    ax = axes[0][0]
    thr = results.get("throughput") or {}
    if thr:
        xs, keys = grouped_bars(
            ax,
            thr,
            (
                ("floor_median", "floor"),
                ("floor_reports_median", "floor + reports"),
                ("service_median", "service"),
                ("service_no_reports_median", "no reports"),
            ),
        )
        for x, k in zip(xs, keys, strict=True):
            top = max(thr[k]["floor_median"], thr[k]["service_median"], thr[k]["service_no_reports_median"])
            ax.text(x, top * 1.05, f"{thr[k]['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("scans/s (log)")
        ax.set_title("(a) throughput; label: service / floor", fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[0][1]
    lat = results.get("latency") or {}
    if lat:
        grouped_bars(
            ax,
            lat,
            (
                ("floor_p50", "floor p50"),
                ("floor_p95", "floor p95"),
                ("service_p50", "service p50"),
                ("service_p95", "service p95"),
            ),
        )
        ax.set_ylabel("ms (log)")
        ax.set_title("(b) single-scan latency", fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[0][2]
    be = (results.get("backends") or {}).get("rows") or {}
    if be:
        keys = list(be)
        xs = np.arange(len(keys))
        ax.bar(xs - 0.2, [be[k]["p50_ms"] for k in keys], 0.4, label="p50")
        ax.bar(xs + 0.2, [be[k]["p95_ms"] for k in keys], 0.4, label="p95")
        ax.set_xticks(xs, keys, rotation=20, fontsize=8)
        ax.set_ylabel("ms per inference, batch 1")
        ax.set_title("(c) backends", fontsize=10)
        ax.legend(fontsize=8)
    scale = results.get("scale")
    if scale:
        sc = scale["scale"]
        ax = axes[1][0]
        ax.plot(np.arange(1, len(sc["latency_by_position_ms"]) + 1), sc["latency_by_position_ms"], ".", ms=3)
        ax.set_xlabel("position in the backlog (rename order)")
        ax.set_ylabel("rename -> result at subscriber, ms")
        ax.set_title(f"(d) {scale['n']} JPEGs at once: drained in {sc['drain_s']:.1f} s", fontsize=10)
        ax = axes[1][1]
        tl = sc["timeline"]
        ax.plot([p["t_s"] for p in tl], [p["rss_mb"] for p in tl], label="sum RSS")
        ax.plot([p["t_s"] for p in tl], [p["pss_mb"] for p in tl], label="sum PSS")
        ax.axhline(TARGET_RSS_MB, color="grey", ls="--", lw=1, label="target")
        ax.set_xlabel("s since the first rename")
        ax.set_ylabel("MB (service + decoder children)")
        twin = ax.twinx()
        twin.plot([p["t_s"] for p in tl], [p["backlog"] for p in tl], color="tab:red", lw=1, label="backlog")
        twin.set_ylabel("scans without a result", color="tab:red")
        ax.legend(fontsize=8, loc="center right")
        ax.set_title("(d) memory and backlog over time", fontsize=10)
        ax = axes[1][2]
        cold = scale["cold_start"]
        names = ["imports only", "first log line", "'starting'", "online", "first result"]
        values = [
            cold["imports_only_s"],
            cold["first_log_s"],
            cold["starting_log_s"],
            cold["online_s"],
            cold["first_result_s"],
        ]
        ax.barh(names, values)
        ax.axvline(TARGET_COLD_S, color="grey", ls="--", lw=1)
        ax.set_xlabel("s since exec")
        ax.set_title("(e) cold start (first result waits Inbox.SettleSeconds)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"
