"""ARM64 conformance, emulated (issue 30): the runtime on Graviton2- and Raspberry-Pi-class CPUs.

The fleet's ARM boxes have never run in CI. Here this checkout's runtime runs under QEMU user
mode (``qemu-aarch64``) in Debian 12's arm64 Python with the aarch64 wheels of the versions in
``.venv`` (built once into a cache by ``tests/arm64/sysroot.sh``; see :mod:`benchmarks.arm64`),
on two CPU models whose INT8 kernels differ: ``neoverse-n1`` (SDOT/UDOT, ``asimddp``) and
``cortex-a72`` (none). Checked there:

* the CPU probe reads the emulated CPU's HWCAP (not the /proc/cpuinfo text, which may lie);
* ``edge-runtime model verify`` passes for each bundled model x backend on each CPU;
* ``edge-runtime process`` on 32 test-split images gives the x86 host's probabilities.

Skipped (with the reason) where ARM64 cannot be emulated: not x86-64 Linux, not root (a private
mount namespace shows the guest an ARM /proc/cpuinfo), no ``qemu-aarch64``, or the cache cannot
be built (no network the first time). ``EDGE_RUNTIME_TESTS_REQUIRE_ARM64=1`` makes that a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA

from benchmarks.arm64 import CPUS, REPO, Arm64Env, Arm64Unavailable, arm64_env, run_arm64

pytestmark = pytest.mark.slow

REQUIRE_ARM64 = "EDGE_RUNTIME_TESTS_REQUIRE_ARM64"
MODELS = REPO / "edge_runtime" / "models"
BUNDLES = sorted(p.name for p in MODELS.iterdir() if (p / "manifest.json").is_file())
#: Every (bundle, backend) the checkout ships: both bundles have an ONNX Runtime and a LiteRT model.
SHIPPED = [
    (name, backend)
    for name in BUNDLES
    for backend in dict.fromkeys(
        artifact["backend"]
        for artifact in json.loads((MODELS / name / "manifest.json").read_text(encoding="utf-8"))["artifacts"]
    )
]
KERMANY_TEST = SHARED_DATA / "cxr" / "kermany_pneumonia_224" / "test"

#: max |p_arm - p_x86| allowed on the same image, per bundle and backend. Measured with
#: benchmarks/bench_arm64.py on all 624 test images, on both emulated CPUs, against an AVX-512 VNNI
#: x86 host (the same on the AVX2-only build machine, whose conformance outputs ARM matches with
#: drift 0). The same value holds on both CPUs; none is tuned to one of them.
TOLERANCE: dict[tuple[str, str], float] = {
    # Measured 0 (bit-identical) on both CPUs: every product is summed exactly in 32 bits (VNNI or
    # VPMADDUBSW without saturation for this recipe on x86, SDOT/UDOT or widening NEON on ARM), and
    # the requantization is the same float32 arithmetic. Any difference is a regression.
    ("pneumonia-cxr", "onnxruntime"): 1e-6,
    # Measured 1.2e-7 on both CPUs: 2 float32 ulps near p = 1 (XNNPACK's float softmax after the
    # INT8 logits, vectorised differently on NEON and AVX-512); the integer part is identical (one
    # INT8 step of a logit would move p by ~1e-2). 1e-6 leaves room for float rounding only.
    ("pneumonia-cxr", "litert"): 1e-6,
    # Measured 8e-5 on both CPUs (0 decisions differ on 624 images): not bit-identical, unlike the
    # other bundle's graph, which differs only by Flatten where this one has Squeeze after its
    # GlobalAveragePools: ORT most likely leaves those pools unfused, in float32, whose sums NEON and
    # AVX-512 order differently, so a value next to a quantization boundary can round to its
    # neighbour. 1e-3 is >10x the largest measured and 50x below the bundle's allowed drift (0.05).
    ("pneumonia-cxr-keras", "onnxruntime"): 1e-3,
    # Measured 9e-8 on neoverse-n1: float32 rounding of the softmax only, as for the other bundle.
    ("pneumonia-cxr-keras", "litert"): 1e-6,
}


@pytest.fixture(scope="module")
def arm() -> Arm64Env:
    try:
        return arm64_env()
    except Arm64Unavailable as exc:
        if os.environ.get(REQUIRE_ARM64) == "1":
            pytest.fail(f"{exc} ({REQUIRE_ARM64}=1)")
        pytest.skip(f"ARM64 emulation unavailable: {exc}")


_PROBE = (
    "import json, platform; from edge_runtime.cpu import cpu_summary; "
    "print(json.dumps({'machine': platform.machine(), 'summary': cpu_summary()}))"
)


@pytest.mark.parametrize(
    ("cpu", "features", "dot"),
    [("neoverse-n1", ["asimddp"], "arm-dot"), ("cortex-a72", [], "other")],
)
def test_the_cpu_probe_reads_the_emulated_cpus_hwcap(
    arm: Arm64Env, cpu: str, features: list[str], dot: str
) -> None:
    # Both CPUs are shown the Neoverse-N1's /proc/cpuinfo, which claims asimddp: the Cortex-A72
    # must still report none, as its HWCAP (what ONNX Runtime's kernel choice reads) has none.
    done = run_arm64(["-c", _PROBE], cpu, 300, cpuinfo=arm.cpuinfo("neoverse-n1"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["machine"] == "aarch64"
    summary = result["summary"]
    assert summary["probe"] == "hwcap"
    assert summary["int8_features"] == features
    assert summary["int8_dot"] == dot


@pytest.mark.parametrize("cpu", list(CPUS))
@pytest.mark.parametrize(("bundle", "backend"), SHIPPED)
def test_model_verify_passes_on_the_emulated_cpu(arm: Arm64Env, bundle: str, backend: str, cpu: str) -> None:
    done = run_arm64(
        ["-m", "edge_runtime.cli", "model", "verify", str(MODELS / bundle), "--backend", backend],
        cpu,
        600,
        extra_env={"EDGE_RUNTIME__MODEL__THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = [line for line in done.stdout.splitlines() if line.startswith("conformance check")]
    assert len(verdicts) == 1, done.stdout[-3000:]
    assert verdicts[0].startswith("conformance check passed"), verdicts[0]
    assert f"on backend {backend} " in verdicts[0]
    # The emulation took: the runtime saw an ARM CPU with (or without) the dot product.
    features = "asimddp" if cpu == "neoverse-n1" else "none"
    assert f"on this CPU (aarch64; INT8 features: {features})" in verdicts[0], verdicts[0]


def _process_env(bundle: str, backend: str) -> dict[str, str]:
    """What ``edge-runtime process`` is given on both sides (as benchmarks/bench_backends.py does)."""
    return {
        "EDGE_RUNTIME__MODEL__BACKEND": backend,
        "EDGE_RUNTIME__MODEL__BUNDLE_PATH": str(MODELS / bundle),
        "EDGE_RUNTIME__MODEL__THREADS": "1",
    }


def _answers(
    done: subprocess.CompletedProcess[str], files: list[Path]
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """P(positive) per file, in order, and (pixel hash, decided label; ``-``: outside the intended use)."""
    assert done.returncode == 0, done.stderr[-3000:]
    messages = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(messages) == len(files), done.stderr[-3000:]
    probabilities = np.array([m["findings"][0]["probability"] for m in messages])
    return probabilities, [
        (m["input"]["sha256"], m["decision"]["label"] if m["decision"] else "-") for m in messages
    ]


@pytest.fixture(scope="module")
def split_sample() -> list[Path]:
    """32 of the official test split's 624 images, spread evenly over both classes."""
    files = [
        path for label in ("NORMAL", "PNEUMONIA") for path in sorted((KERMANY_TEST / label).glob("*.jpeg"))
    ]
    if len(files) != 624:
        pytest.skip(f"the Kermany test split is not under {KERMANY_TEST} (found {len(files)} images)")
    return [files[i] for i in np.linspace(0, len(files) - 1, 32).round().astype(int)]


@pytest.mark.parametrize(("bundle", "backend"), SHIPPED)
def test_process_on_arm_gives_the_x86_probabilities(
    arm: Arm64Env, split_sample: list[Path], bundle: str, backend: str
) -> None:
    # One CPU here (the Graviton2 class, the fleet's ARM servers); verify above runs both.
    command = ["-m", "edge_runtime.cli", "process", *map(str, split_sample)]
    native = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=REPO,
        env={**os.environ, **_process_env(bundle, backend)},
    )
    p_x86, decisions_x86 = _answers(native, split_sample)
    emulated = run_arm64(command, "neoverse-n1", 600, extra_env=_process_env(bundle, backend))
    p_arm, decisions_arm = _answers(emulated, split_sample)
    tolerance = TOLERANCE[bundle, backend]
    worst = float(np.abs(p_arm - p_x86).max())
    assert worst <= tolerance, f"max |p_arm - p_x86| {worst:.3g} > {tolerance} ({bundle}, {backend})"
    assert decisions_arm == decisions_x86
