"""``python -m training evaluate-report``: its parser, help texts and entry point."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .build import _display, build_report
from .common import (
    DEFAULT_DATA,
    DEFAULT_OUT,
    DEFAULT_SPLIT_FILE,
    FIGURES,
    METRICS_NAME,
    PREDICTIONS_NAME,
    REPORT_NAME,
    SPLITS,
)

if TYPE_CHECKING:
    pass


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
