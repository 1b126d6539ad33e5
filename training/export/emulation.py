"""Run ONNX Runtime as it runs on an AVX2-only x86-64 CPU, on whatever x86-64 CPU this is.

The fleet mixes Intel machines with AVX-512 VNNI and AMD machines with AVX2
only, and ONNX Runtime's INT8 kernels differ between them (see
:mod:`edge_runtime.cpu`). A build machine or CI runner has only one of the
two, so a quantized model is also run under QEMU's user-mode emulator with a
CPU model that has AVX2 but no AVX-512 (``EPYC-Milan``, i.e. AMD Zen 3):
QEMU answers CPUID for that model, ONNX Runtime picks its AVX2 kernels, and
the real ``VPMADDUBSW`` semantics (saturation included) are emulated. It is
slow (about 50x), so it is used on a few dozen images.

No torch here: the child process imports only numpy and onnxruntime.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["AVX2_ONLY_CPU", "emulator", "outputs_emulated", "predict_emulated", "run_emulated"]

#: QEMU CPU model used as "an AVX2 machine without VNNI" (AMD EPYC Zen 3).
AVX2_ONLY_CPU = "EPYC-Milan"


def emulator() -> str | None:
    """Path of ``qemu-x86_64`` when this is an x86-64 host that has it (Debian ``qemu-user``)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    return shutil.which("qemu-x86_64")


def run_emulated(
    args: list[str], cpu: str = AVX2_ONLY_CPU, timeout_s: float = 900.0
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` under the emulated ``cpu``; raises ``RuntimeError`` without an emulator."""
    qemu = emulator()
    if qemu is None:
        raise RuntimeError("qemu-x86_64 is not installed (apt-get install qemu-user) or this is not x86-64.")
    return subprocess.run(
        [qemu, "-cpu", cpu, sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def predict_emulated(
    model_path: str | Path, samples: np.ndarray, cpu: str = AVX2_ONLY_CPU, timeout_s: float = 900.0
) -> np.ndarray:
    """The model's first output for ``samples``, computed by ONNX Runtime on the emulated ``cpu``."""
    with tempfile.TemporaryDirectory(prefix="emulated-") as tmp:
        x_path, y_path = Path(tmp) / "x.npy", Path(tmp) / "y.npy"
        np.save(x_path, np.ascontiguousarray(samples, dtype=np.float32))
        done = run_emulated(
            ["-m", "training.export.emulated_infer", str(model_path), str(x_path), str(y_path)],
            cpu,
            timeout_s,
        )
        if done.returncode != 0 or not y_path.is_file():
            raise RuntimeError(f"emulated inference failed (exit {done.returncode}): {done.stderr[-2000:]}")
        return np.load(y_path)


def outputs_emulated(
    model_path: str | Path,
    samples: np.ndarray,
    names: Sequence[str],
    cpu: str = AVX2_ONLY_CPU,
    timeout_s: float = 900.0,
) -> dict[str, np.ndarray]:
    """The named outputs (e.g. ``probabilities`` and ``features``) for ``samples`` on the emulated ``cpu``.

    One emulated session computes them all, so checking the features costs no second run.
    """
    with tempfile.TemporaryDirectory(prefix="emulated-") as tmp:
        x_path, y_path = Path(tmp) / "x.npy", Path(tmp) / "y.npz"
        np.save(x_path, np.ascontiguousarray(samples, dtype=np.float32))
        done = run_emulated(
            ["-m", "training.export.emulated_infer", str(model_path), str(x_path), str(y_path), *names],
            cpu,
            timeout_s,
        )
        if done.returncode != 0 or not y_path.is_file():
            raise RuntimeError(f"emulated inference failed (exit {done.returncode}): {done.stderr[-2000:]}")
        with np.load(y_path) as saved:
            return {name: np.asarray(saved[name]) for name in names}
