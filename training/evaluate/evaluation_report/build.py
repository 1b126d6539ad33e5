"""Score, compute, draw and write: :func:`build_report`, with the provenance it records."""

from __future__ import annotations

import csv
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cases import _cases, _dataset, _read_data_manifest, _split_title, data_fingerprint
from .common import FIGURES, GROUP_ORDER, METRICS_NAME, PREDICTIONS_NAME, REPORT_NAME
from .markdown import render_markdown
from .plots import plot_confusion, plot_pr, plot_reliability, plot_roc, plot_scores
from .scores import ModelResult, predict_cases, summarize

if TYPE_CHECKING:
    pass


def _display(path: Path) -> str:
    """A path as the reader should type it: relative to the working folder when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _code_version() -> str:
    repo = Path(__file__).resolve().parents[3]  # training/evaluate/evaluation_report/build.py -> the checkout
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
    recorded = bundle.manifest.metrics.get("test") if split == "test" else None
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
        "threshold_method": bundle.manifest.operating_point.method or "operating point",
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
