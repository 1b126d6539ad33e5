"""Names, defaults and constants the report's parts share."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


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
