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
  with the manifest's spec -> the edge's ONNX Runtime backend, P(positive)
  read with the manifest's head (:mod:`training.evaluate.scoring`), so the numbers are
  those of the model as the device runs it. The bundle is loaded with
  :func:`edge_runtime.bundle.load_bundle`, which verifies its sha256 hashes.

Every metric comes from :mod:`training.evaluate.metrics`; this package only scores
images, draws and writes, one job per module: :mod:`.cases` (which images),
:mod:`.scores` (scoring and the numbers per model), :mod:`.plots` (figures),
:mod:`.markdown` (report text), :mod:`.build` (orchestration and
provenance), :mod:`.cli` (``python -m training evaluate-report``). No torch is needed.
"""

from __future__ import annotations

from .build import build_report, reproduce_command
from .cases import Case, data_fingerprint, list_cases
from .cli import REPORT_DESCRIPTION, REPORT_EPILOG, REPORT_HELP, add_report_parser, run_from_args
from .common import FIGURES, METRICS_NAME, PREDICTIONS_NAME, REPORT_NAME
from .markdown import render_markdown
from .scores import ModelResult, predict_cases, summarize

__all__ = [
    "FIGURES",
    "METRICS_NAME",
    "PREDICTIONS_NAME",
    "REPORT_DESCRIPTION",
    "REPORT_EPILOG",
    "REPORT_HELP",
    "REPORT_NAME",
    "Case",
    "ModelResult",
    "add_report_parser",
    "build_report",
    "data_fingerprint",
    "list_cases",
    "predict_cases",
    "render_markdown",
    "reproduce_command",
    "run_from_args",
    "summarize",
]
