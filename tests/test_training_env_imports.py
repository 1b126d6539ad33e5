"""The edge modules the TFLite export environment imports load without the edge's DICOM stack.

``.venv-tflite`` (training/tflite_env.sh) holds torch, the converter, numpy, OpenCV,
cryptography and pydantic, but not pydicom, pynetdicom, highdicom, paho or watchdog. The
export imports ``edge_runtime.bundle``, ``cpu``, ``preprocess`` and, to check heat-maps,
``heat``: a module-level import of pydicom on that path (``results.py`` once had one)
fails the export only in the slow suite, 40 minutes into CI. This runs the same imports here
with those packages made unimportable.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Installed in the runtime's environment, absent from .venv-tflite.
ABSENT = ("pydicom", "pynetdicom", "highdicom", "paho", "watchdog", "fhir", "awsiot", "awscrt", "gdcm")
#: What training/export/tflite_export.py imports from edge_runtime, at module level or lazily.
IMPORTED = ("edge_runtime.bundle", "edge_runtime.cpu", "edge_runtime.preprocess", "edge_runtime.heat")

_CHILD = f"""
import importlib, importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in .venv-tflite)")
        return None

sys.meta_path.insert(0, Absent())
for module in {IMPORTED!r}:
    importlib.import_module(module)
from edge_runtime.heat import heat_difference
print("imported", len({IMPORTED!r}))
"""


def test_the_tflite_export_imports_load_without_the_dicom_stack() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"imported {len(IMPORTED)}"


def test_the_list_of_imports_is_the_export_modules_own() -> None:
    source = (REPO / "training/export/tflite_export.py").read_text(encoding="utf-8")
    for module in IMPORTED:
        assert f"from {module} import" in source, module
