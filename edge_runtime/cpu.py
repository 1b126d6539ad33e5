"""What this CPU can do, in the terms that decide how INT8 models compute.

ONNX Runtime picks its integer kernels by CPU feature: with AVX-512 VNNI or
AVX-VNNI the u8 x s8 products are summed straight into 32 bits, while plain
AVX2/AVX-512 machines use ``VPMADDUBSW``, whose 16-bit intermediate saturates
when two products add up to more than 32767. ARM uses its dot-product
instructions, again without saturation. The conformance check and the
heartbeat name these features so that an admin who sees a model refused on
one box and accepted on another can tell why.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import TypedDict

__all__ = ["INT8_FEATURES", "CpuSummary", "cpu_summary", "int8_features"]

#: The instruction-set flags (as /proc/cpuinfo spells them) that change INT8 arithmetic.
INT8_FEATURES: tuple[str, ...] = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "asimddp",  # ARM dot product (SDOT/UDOT)
    "i8mm",  # ARM int8 matrix multiply
)


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; empty where it cannot be read."""
    model, flags = "", frozenset[str]()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model or platform.machine(), flags


# numpy asks the CPU itself (CPUID / HWCAP), so it reports what this process really gets, also
# under an emulator or a hypervisor that masks features; /proc/cpuinfo is the fallback for the
# flags numpy does not know (AVX-VNNI, AMX, I8MM).
_NUMPY_NAMES = {
    "avx2": "AVX2",
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512_vnni": "AVX512VNNI",
    "asimddp": "ASIMDDP",
}


@functools.cache
def _numpy_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # pragma: no cover - numpy < 2 or a build without the dispatcher
        return {}
    return dict(__cpu_features__)


def int8_features() -> list[str]:
    """The :data:`INT8_FEATURES` this CPU has, e.g. ``['avx2', 'avx512f', 'avx512_vnni']``."""
    _, flags = _cpuinfo()
    detected = _numpy_features()
    have = []
    for name in INT8_FEATURES:
        key = _NUMPY_NAMES.get(name, "")
        if detected.get(key, name in flags):
            have.append(name)
    return have


class CpuSummary(TypedDict):
    """What :func:`cpu_summary` returns (and what bundles, reports and the status record)."""

    machine: str
    model: str
    int8_features: list[str]
    int8_dot: str


def cpu_summary() -> CpuSummary:
    """Machine, model name and INT8-relevant features: for logs, status and reports.

    ``int8_dot`` says how u8 x s8 products are summed: ``vnni`` (32-bit, exact),
    ``vpmaddubsw`` (16-bit intermediate that can saturate), ``arm-dot`` or
    ``other``.
    """
    model, _ = _cpuinfo()
    features = int8_features()
    if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(features):
        dot = "vnni"
    elif "avx2" in features:
        dot = "vpmaddubsw"
    elif "asimddp" in features:
        dot = "arm-dot"
    else:
        dot = "other"
    return {"machine": platform.machine(), "model": model, "int8_features": features, "int8_dot": dot}
