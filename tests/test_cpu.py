"""The CPU probe reports what the processor gives this process, on every CPU and under emulation.

CI failed on Intel hosts with AVX-VNNI because the probe took AVX-VNNI from
/proc/cpuinfo, which under QEMU user mode is the host's: an emulated AVX2-only
EPYC reported ``int8_dot: vnni``. These tests decode known CPUID words, then
run the real probe natively and under QEMU with a /proc/cpuinfo that claims
every VNNI flag (the Intel host's view), and hold its answer to the CPUID
that the process really sees.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_runtime import cpu
from edge_runtime.cpu import X86Registers, arm_features, cpu_summary, x86_features
from training.export.emulation import AVX2_ONLY_CPU

REPO = Path(__file__).resolve().parents[1]
X86 = platform.machine() in ("x86_64", "AMD64")
QEMU = shutil.which("qemu-x86_64") if X86 else None

# CPUID.1:ECX OSXSAVE (27) + AVX (28); XCR0 with SSE/AVX, AVX-512 and AMX state enabled.
LEAF1 = (0, 0, 1 << 27 | 1 << 28, 0)
XCR0_ALL = 0b111 | 0b1110_0000 | 0b11 << 17
AVX2 = 1 << 5
AVX512F, AVX512BW = 1 << 16, 1 << 30
AVX512_VNNI = 1 << 11  # leaf 7.0 ECX
AMX_TILE, AMX_INT8 = 1 << 24, 1 << 25  # leaf 7.0 EDX
AVX_VNNI = 1 << 4  # leaf 7.1 EAX


def regs(ebx7: int = 0, ecx7: int = 0, edx7: int = 0, eax71: int = 0, xcr0: int = XCR0_ALL) -> X86Registers:
    return X86Registers(LEAF1, (1, ebx7, ecx7, edx7), (eax71, 0, 0, 0), xcr0)


def test_x86_feature_words_decode_like_the_processors_of_the_fleet() -> None:
    zen3 = regs(ebx7=AVX2)
    zen4 = regs(ebx7=AVX2 | AVX512F | AVX512BW, ecx7=AVX512_VNNI)
    alder_lake = regs(ebx7=AVX2, eax71=AVX_VNNI)
    sapphire_rapids = regs(
        ebx7=AVX2 | AVX512F | AVX512BW, ecx7=AVX512_VNNI, edx7=AMX_TILE | AMX_INT8, eax71=AVX_VNNI
    )
    assert x86_features(zen3) == ["avx2"]
    assert x86_features(zen4) == ["avx2", "avx512f", "avx512bw", "avx512_vnni"]
    assert x86_features(alder_lake) == ["avx2", "avx_vnni"]
    assert x86_features(sapphire_rapids) == [
        "avx2",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "amx_int8",
    ]


def test_features_whose_registers_the_os_does_not_save_are_not_reported() -> None:
    sapphire_rapids = dict(
        ebx7=AVX2 | AVX512F | AVX512BW, ecx7=AVX512_VNNI, edx7=AMX_TILE | AMX_INT8, eax71=AVX_VNNI
    )
    # A kernel (or hypervisor) that saves only the YMM state: AVX-512 and AMX cannot be used.
    assert x86_features(regs(**sapphire_rapids, xcr0=0b111)) == ["avx2", "avx_vnni"]
    # No OSXSAVE at all: not even AVX2.
    no_xsave = X86Registers((0, 0, 1 << 28, 0), (1, AVX2, 0, 0), (AVX_VNNI, 0, 0, 0), 0)
    assert x86_features(no_xsave) == []


def test_arm_hwcaps_decode_to_the_dot_product_features() -> None:
    assert arm_features(0, 0) == []
    assert arm_features(1 << 20, 0) == ["asimddp"]  # Neoverse N1, Cortex-A76
    assert arm_features(1 << 20, 1 << 13) == ["asimddp", "i8mm"]  # Neoverse V1/N2, Graviton 3


@pytest.mark.parametrize(
    ("features", "dot"),
    [
        (["avx2"], "vpmaddubsw"),
        (["avx2", "avx512f", "avx512bw"], "vpmaddubsw"),
        (["avx2", "avx_vnni"], "vnni"),
        (["avx2", "avx512f", "avx512bw", "avx512_vnni"], "vnni"),
        (["asimddp", "i8mm"], "arm-dot"),
        ([], "other"),
    ],
)
def test_the_summary_names_how_u8_s8_products_are_summed(
    features: list[str], dot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu, "_probe", lambda: ("a CPU", features, "cpuid"))
    assert cpu_summary()["int8_dot"] == dot


def _numpy_view(features: dict[str, bool]) -> list[str]:
    """The INT8 features numpy's own CPUID probe can name (it has no AVX-VNNI or AMX)."""
    names = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512_vnni": "AVX512VNNI"}
    names["asimddp"] = "ASIMDDP"
    return [ours for ours, theirs in names.items() if features.get(theirs)]


def test_the_native_probe_reads_the_processor_and_agrees_with_numpy() -> None:
    from numpy._core._multiarray_umath import __cpu_features__

    summary = cpu_summary()
    known_to_numpy = {"avx2", "avx512f", "avx512bw", "avx512_vnni", "asimddp"}
    ours = [name for name in summary["int8_features"] if name in known_to_numpy]
    assert ours == _numpy_view(dict(__cpu_features__))
    if X86 or platform.machine() in ("aarch64", "arm64"):
        assert summary["probe"] in ("cpuid", "hwcap")


def test_without_an_executable_page_the_probe_says_it_fell_back_to_proc_cpuinfo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused() -> X86Registers:
        raise PermissionError("mmap: PROT_EXEC refused")

    monkeypatch.setattr(cpu, "_read_x86", refused)
    monkeypatch.setattr(cpu, "_read_hwcaps", lambda: (_ for _ in ()).throw(OSError("no getauxval")))
    cpu._probe.cache_clear()
    try:
        summary = cpu_summary()
    finally:
        cpu._probe.cache_clear()
    assert summary["probe"] == "cpuinfo"
    flags = cpu._cpuinfo()[1]
    assert summary["int8_features"] == [name for name in cpu.INT8_FEATURES if name in flags]


# -- the real probe in a child: natively and under QEMU, with the host's /proc/cpuinfo faked --------

_CHILD = (
    "import json; from edge_runtime.cpu import cpu_summary; "
    "from numpy._core._multiarray_umath import __cpu_features__ as f; "
    "print(json.dumps({'summary': cpu_summary(), 'numpy': {k: bool(v) for k, v in f.items()}}))"
)


def _run_child(prefix: list[str], fake_cpuinfo: Path | None = None) -> dict[str, object]:
    import json

    command = [*prefix, sys.executable, "-c", _CHILD]
    if fake_cpuinfo is not None:
        # A private mount namespace: /proc/cpuinfo reads as the Intel host's, for this child only.
        script = 'mount --bind "$0" /proc/cpuinfo && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", script, str(fake_cpuinfo), *command]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, cwd=REPO, env=_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


#: The flags an INT8 kernel choice turns on; the lying /proc/cpuinfo below flips each of them.
INT8_FLAGS = frozenset(
    {"avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "asimddp", "i8mm"}
)


def _flags_of(text: str) -> set[str]:
    line = next(line for line in text.splitlines() if line.startswith(("flags", "Features")))
    return set(line.partition(":")[2].split())


def _private_cpuinfo(tmp_path_factory: pytest.TempPathFactory, flags: Callable[[set[str]], set[str]]) -> Path:
    """This machine's /proc/cpuinfo with its flags rewritten by ``flags``, to mount over the real one."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a private /proc/cpuinfo (CI runs as root)")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not allowed here: {probe.stderr.strip()}")
    lines = []
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith(("flags", "Features")):
            key, _, have = line.partition(":")
            line = f"{key}: " + " ".join(sorted(flags(set(have.split()))))
        lines.append(line)
    path = tmp_path_factory.mktemp("cpuinfo") / "cpuinfo"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lying_cpuinfo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every INT8 flag flipped: what this CPU has is gone, what it lacks is claimed.

    On an AVX2-only host this is what an Intel host with VNNI and AMX shows QEMU; on a host with
    VNNI it claims less than the CPU has. Either way the probe must answer as for the real CPU.
    """
    return _private_cpuinfo(tmp_path_factory, lambda have: (have - INT8_FLAGS) | (INT8_FLAGS - have))


@pytest.fixture(scope="module")
def intel_host_cpuinfo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every INT8 flag claimed: what an Intel host with VNNI and AMX shows a program under QEMU."""
    return _private_cpuinfo(tmp_path_factory, lambda have: have | INT8_FLAGS)


def test_the_native_probe_ignores_a_proc_cpuinfo_that_claims_otherwise(lying_cpuinfo: Path) -> None:
    honest = _run_child([])
    lied_to = _run_child([], lying_cpuinfo)
    assert lied_to["summary"] == honest["summary"]
    # The lie is a real one here: every INT8 flag of the fake differs from this CPU's.
    real, fake = _flags_of(Path("/proc/cpuinfo").read_text()), _flags_of(lying_cpuinfo.read_text())
    assert (real & INT8_FLAGS).isdisjoint(fake) and INT8_FLAGS - real <= fake


#: QEMU CPU model -> (brand string QEMU gives it, INT8 features that CPU model can never have).
EMULATED = {
    AVX2_ONLY_CPU: (
        "AMD EPYC-Milan Processor",
        {"avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"},
    ),
    "Icelake-Server": ("Intel Xeon Processor (Icelake)", {"avx_vnni", "amx_int8"}),
}


@pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 on an x86-64 host (apt-get install qemu-user)")
@pytest.mark.parametrize("model", sorted(EMULATED))
def test_under_qemu_the_probe_reports_the_emulated_cpu_not_the_host(
    model: str, intel_host_cpuinfo: Path
) -> None:
    assert QEMU is not None
    brand, never = EMULATED[model]
    seen = _run_child([QEMU, "-cpu", model], intel_host_cpuinfo)
    summary = seen["summary"]
    assert isinstance(summary, dict) and isinstance(seen["numpy"], dict)
    assert summary["probe"] == "cpuid"
    assert summary["model"] == brand
    features = summary["int8_features"]
    assert not set(features) & never, f"{model} reported {features}: the host's flags leaked in"
    # Each feature numpy's own CPUID probe knows is reported exactly as it sees it under QEMU
    # (QEMU 7.2's TCG has AVX2 but no AVX-512, so an emulated Icelake is AVX2-only too).
    known_to_numpy = {"avx2", "avx512f", "avx512bw", "avx512_vnni"}
    assert [f for f in features if f in known_to_numpy] == _numpy_view(seen["numpy"])
    assert "avx2" in features
    expected_dot = "vnni" if "avx512_vnni" in features else "vpmaddubsw"
    assert summary["int8_dot"] == expected_dot
