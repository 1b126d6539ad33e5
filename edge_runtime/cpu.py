"""What this CPU can do, in the terms that decide how INT8 models compute.

ONNX Runtime picks its integer kernels by CPU feature: with AVX-512 VNNI or
AVX-VNNI the u8 x s8 products are summed straight into 32 bits, while plain
AVX2/AVX-512 machines use ``VPMADDUBSW``, whose 16-bit intermediate saturates
when two products add up to more than 32767. ARM uses its dot-product
instructions, again without saturation. The conformance check and the
heartbeat name these features so that an admin who sees a model refused on
one box and accepted on another can tell why.

Every feature comes from the processor itself, the way ONNX Runtime's own
kernel choice reads it: ``CPUID`` (with the OS's ``XGETBV`` state mask) on
x86-64, the kernel's ``HWCAP`` words on ARM64. ``/proc/cpuinfo`` is not
trusted: under an emulator (QEMU user mode, which CI uses to run an AVX2-only
CPU) or a hypervisor that masks features it describes the *host*, so a box
would report VNNI that its kernels never get. It is read only where neither
probe can run (another OS or architecture), and the summary then says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import platform
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

__all__ = [
    "INT8_FEATURES",
    "CpuSummary",
    "X86Registers",
    "arm_features",
    "cpu_summary",
    "int8_features",
    "x86_features",
]

#: The instruction-set flags (spelled as Linux's /proc/cpuinfo does) that change INT8 arithmetic.
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

#: Where the features were read: the processor (``cpuid``, ``hwcap``) or, as a last resort, the
#: text the kernel writes (``cpuinfo``), which is the host's under an emulator.
Probe = Literal["cpuid", "hwcap", "cpuinfo"]


_Leaf = tuple[int, int, int, int]


@dataclass(frozen=True)
class X86Registers:
    """The CPUID words that hold the INT8 features, and the OS's enabled register state.

    Each leaf is ``(eax, ebx, ecx, edx)``; a leaf the CPU does not have is all zeros.
    """

    leaf1: _Leaf
    leaf7: _Leaf
    leaf7_1: _Leaf
    xcr0: int
    brand: str = ""


def _bit(word: int, n: int) -> bool:
    return bool(word >> n & 1)


# XCR0: which register files the OS saves on a context switch. A feature whose registers the OS
# does not save is unusable, whatever CPUID says (numpy and ONNX Runtime's cpuinfo check the same).
_XCR0_AVX = 0b110  # SSE + AVX (YMM upper halves)
_XCR0_AVX512 = 0b1110_0000  # opmask, ZMM upper halves, ZMM16-31
_XCR0_AMX = 0b11 << 17  # XTILECFG, XTILEDATA


def x86_features(regs: X86Registers) -> list[str]:
    """The :data:`INT8_FEATURES` that these CPUID words and this XCR0 make usable."""
    _, _, ecx1, _ = regs.leaf1
    _, ebx7, ecx7, edx7 = regs.leaf7
    eax71 = regs.leaf7_1[0]
    osxsave = _bit(ecx1, 27)
    avx_os = osxsave and regs.xcr0 & _XCR0_AVX == _XCR0_AVX
    avx512_os = avx_os and regs.xcr0 & _XCR0_AVX512 == _XCR0_AVX512
    amx_os = osxsave and regs.xcr0 & _XCR0_AMX == _XCR0_AMX
    avx = avx_os and _bit(ecx1, 28)
    have = {
        "avx2": avx and _bit(ebx7, 5),
        "avx512f": avx512_os and _bit(ebx7, 16),
        "avx512bw": avx512_os and _bit(ebx7, 16) and _bit(ebx7, 30),
        "avx512_vnni": avx512_os and _bit(ebx7, 16) and _bit(ecx7, 11),
        "avx_vnni": avx and _bit(eax71, 4),
        "amx_int8": amx_os and _bit(edx7, 24) and _bit(edx7, 25),
    }
    return [name for name in INT8_FEATURES if have.get(name)]


#: Linux's HWCAP bits for arm64 (arch/arm64/include/uapi/asm/hwcap.h).
_HWCAP_ASIMDDP = 1 << 20
_HWCAP2_I8MM = 1 << 13


def arm_features(hwcap: int, hwcap2: int) -> list[str]:
    """The :data:`INT8_FEATURES` in Linux's arm64 ``AT_HWCAP`` and ``AT_HWCAP2`` words."""
    have = {"asimddp": bool(hwcap & _HWCAP_ASIMDDP), "i8mm": bool(hwcap2 & _HWCAP2_I8MM)}
    return [name for name in INT8_FEATURES if have.get(name)]


# x86-64 System V machine code, run from an executable page: the smallest CPUID reader there is,
# with no compiler at install time (what py-cpuinfo does too, whose own reader stops at leaf 7.0
# and so cannot see AVX-VNNI).
#   void cpuid(u32 leaf /*edi*/, u32 subleaf /*esi*/, u32 out[4] /*rdx*/)
_CPUID_CODE = bytes.fromhex(
    "53"  # push rbx            (callee-saved, CPUID writes it)
    "89f8"  # mov eax, edi
    "89f1"  # mov ecx, esi
    "4989d0"  # mov r8, rdx
    "0fa2"  # cpuid
    "418900"  # mov [r8], eax
    "41895804"  # mov [r8+4], ebx
    "41894808"  # mov [r8+8], ecx
    "4189500c"  # mov [r8+12], edx
    "5b"  # pop rbx
    "c3"  # ret
)
#   u64 xgetbv(u32 index /*edi*/)  (only called when CPUID says the OS enabled XSAVE)
_XGETBV_CODE = bytes.fromhex(
    "89f9"  # mov ecx, edi
    "0f01d0"  # xgetbv
    "48c1e220"  # shl rdx, 32
    "4809d0"  # or rax, rdx
    "c3"  # ret
)
_XGETBV_OFFSET = 64


def _read_x86() -> X86Registers:
    """Run CPUID and XGETBV here; raises ``OSError`` where no executable page can be had."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    try:
        page.write(_CPUID_CODE)
        page.seek(_XGETBV_OFFSET)
        page.write(_XGETBV_CODE)
        anchor = ctypes.c_char.from_buffer(page)
        base = ctypes.addressof(anchor)
        cpuid_fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(
            base
        )
        xgetbv_fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(base + _XGETBV_OFFSET)
        regs = _x86_registers(cpuid_fn, xgetbv_fn)
        # Nothing may point into the page once it is closed.
        del cpuid_fn, xgetbv_fn, anchor
    finally:
        with contextlib.suppress(BufferError):  # only if reading failed half-way: the page leaks
            page.close()
    return regs


def _x86_registers(cpuid_fn: Callable[..., None], xgetbv_fn: Callable[[int], int]) -> X86Registers:
    def cpuid(leaf: int, subleaf: int = 0) -> _Leaf:
        out = (ctypes.c_uint32 * 4)()
        cpuid_fn(leaf, subleaf, out)
        return (out[0], out[1], out[2], out[3])

    zero = (0, 0, 0, 0)
    top = cpuid(0)[0]
    leaf1 = cpuid(1) if top >= 1 else zero
    leaf7 = cpuid(7, 0) if top >= 7 else zero
    leaf7_1 = cpuid(7, 1) if top >= 7 and leaf7[0] >= 1 else zero
    xcr0 = int(xgetbv_fn(0)) if _bit(leaf1[2], 27) else 0
    brand = ""
    if cpuid(0x8000_0000)[0] >= 0x8000_0004:
        raw = b"".join(struct.pack("<4I", *cpuid(leaf)) for leaf in (0x8000_0002, 0x8000_0003, 0x8000_0004))
        brand = raw.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()
    return X86Registers(leaf1, leaf7, leaf7_1, xcr0, brand)


def _read_hwcaps() -> tuple[int, int]:
    """``getauxval(AT_HWCAP)``, ``getauxval(AT_HWCAP2)`` from the C library."""
    libc = ctypes.CDLL(None)
    getauxval = libc.getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    at_hwcap, at_hwcap2 = 16, 26
    return int(getauxval(at_hwcap)), int(getauxval(at_hwcap2))


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


_X86 = ("x86_64", "amd64")
_ARM64 = ("aarch64", "arm64")


@functools.cache
def _probe() -> tuple[str, list[str], Probe]:
    """(model name, INT8 features, where they were read), once per process."""
    machine = platform.machine().lower()
    if machine in _X86:
        try:
            regs = _read_x86()
        except (OSError, ValueError, TypeError, AttributeError):  # no executable page here
            pass
        else:
            return regs.brand or _cpuinfo()[0], x86_features(regs), "cpuid"
    if machine in _ARM64 and sys.platform == "linux":
        try:
            hwcap, hwcap2 = _read_hwcaps()
        except (OSError, AttributeError):  # a C library without getauxval
            pass
        else:
            return _cpuinfo()[0], arm_features(hwcap, hwcap2), "hwcap"
    model, flags = _cpuinfo()
    return model, [name for name in INT8_FEATURES if name in flags], "cpuinfo"


def int8_features() -> list[str]:
    """The :data:`INT8_FEATURES` this CPU has, e.g. ``['avx2', 'avx512f', 'avx512_vnni']``."""
    return list(_probe()[1])


class CpuSummary(TypedDict):
    """What :func:`cpu_summary` returns (and what bundles, reports and the status record)."""

    machine: str
    model: str
    int8_features: list[str]
    int8_dot: str
    probe: Probe


def cpu_summary() -> CpuSummary:
    """Machine, model name and INT8-relevant features: for logs, status and reports.

    ``int8_dot`` says how u8 x s8 products are summed: ``vnni`` (32-bit, exact),
    ``vpmaddubsw`` (16-bit intermediate that can saturate), ``arm-dot`` or
    ``other``. ``probe`` says where the features were read (see the module's
    docstring).
    """
    model, features, probe = _probe()
    if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(features):
        dot = "vnni"
    elif "avx2" in features:
        dot = "vpmaddubsw"
    elif "asimddp" in features:
        dot = "arm-dot"
    else:
        dot = "other"
    return {
        "machine": platform.machine(),
        "model": model,
        "int8_features": list(features),
        "int8_dot": dot,
        "probe": probe,
    }
