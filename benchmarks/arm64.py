"""Run this checkout's runtime on an emulated ARM64 CPU (issue 30), from an x86-64 Linux host.

The pieces come from ``tests/arm64/sysroot.sh``, which builds them once into a cache
(``$ARM64_CACHE``, default ``~/.cache/healthdiag-arm64``): Debian 12's arm64 ``python3.11`` and
its libraries (unpacked, not installed), the aarch64 wheels of what ``edge-runtime model verify``
and ``edge-runtime process`` import (the versions in ``.venv``), and an ARM ``/proc/cpuinfo`` per
emulated CPU. :func:`run_arm64` runs ``python3.11 ARGS`` there under Debian's ``qemu-aarch64``
(7.2, package ``qemu-user``), through the cache's ``python3.11-emulated``: a host shell script
that starts QEMU, and the guest's ``sys.executable``, so that the Python processes the runtime
starts itself (the decoder sandbox's ``forkserver``) are emulated too (the host has no
``binfmt_misc`` entry for aarch64, and needs none):

* ``-cpu neoverse-n1`` (AWS Graviton2: dot product, ``asimddp``) or ``-cpu cortex-a72``
  (Raspberry Pi 4: no dot product). QEMU sets the guest's ``HWCAP`` from the model, and
  ONNX Runtime, LiteRT and :mod:`edge_runtime.cpu` choose their INT8 kernels from ``HWCAP``;
* the repository on ``PYTHONPATH`` after the wheels, so ``edge_runtime`` is this checkout's;
* in a private mount namespace (``unshare -m``, as root) whose ``/proc/cpuinfo`` is the
  emulated CPU's: QEMU 7.2 shows the guest the *host's* x86 text, and the ``cpuinfo`` library
  inside ONNX Runtime and LiteRT dies with SIGSEGV at import when it parses that.

Anything missing (not x86-64 Linux, not root, no ``unshare``/``qemu-aarch64``, no network for the
first build) raises :class:`Arm64Unavailable` with the reason, for a test to skip on.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CPUS",
    "REPO",
    "SYSROOT_SCRIPT",
    "Arm64Env",
    "Arm64Unavailable",
    "arm64_command",
    "arm64_env",
    "guest_environ",
    "run_arm64",
]

REPO = Path(__file__).resolve().parents[1]
SYSROOT_SCRIPT = REPO / "tests" / "arm64" / "sysroot.sh"

#: The emulated CPUs: QEMU model name -> what it stands for. Both have ``cpuinfo/<name>`` in the cache.
CPUS: dict[str, str] = {
    "neoverse-n1": "Arm Neoverse-N1 (AWS Graviton2): ASIMD dot product (asimddp)",
    "cortex-a72": "Arm Cortex-A72 (Raspberry Pi 4): no dot product",
}


class Arm64Unavailable(RuntimeError):
    """ARM64 cannot be emulated here; the message says why (for ``pytest.skip``)."""


@dataclass(frozen=True)
class Arm64Env:
    """Where the cache's pieces are (what ``sysroot.sh`` printed)."""

    sysroot: Path
    wheels: Path
    cpuinfo_dir: Path
    python: Path
    qemu: Path

    def cpuinfo(self, cpu: str) -> Path:
        path = self.cpuinfo_dir / cpu
        if cpu not in CPUS or not path.is_file():
            raise ValueError(f"no ARM /proc/cpuinfo for QEMU CPU {cpu!r} (have: {', '.join(CPUS)})")
        return path


def _host_problem() -> str | None:
    """Why this host cannot run the emulation at all (before any download), or None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs an x86-64 Linux host (this is {sys.platform}/{platform.machine()})"
    if shutil.which("qemu-aarch64") is None:
        return "needs qemu-aarch64 (apt-get install qemu-user)"
    if os.geteuid() != 0:
        return "needs root, to mount an ARM /proc/cpuinfo in a private mount namespace (unshare -m)"
    if shutil.which("unshare") is None:
        return "needs unshare(1) (apt-get install util-linux)"
    return None


@functools.cache
def arm64_env(build_timeout_s: float = 900.0) -> Arm64Env:
    """The cache's pieces, built by ``tests/arm64/sysroot.sh`` the first time (seconds once cached).

    Raises:
        Arm64Unavailable: this host cannot emulate ARM64, or the pieces cannot be fetched.
    """
    problem = _host_problem()
    if problem is not None:
        raise Arm64Unavailable(problem)
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        raise Arm64Unavailable(f"unshare -m is not allowed here: {probe.stderr.strip()}")
    try:
        done = subprocess.run(
            ["bash", str(SYSROOT_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=build_timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise Arm64Unavailable(f"{SYSROOT_SCRIPT.name} took over {build_timeout_s:.0f} s") from exc
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise Arm64Unavailable(f"the ARM64 sysroot could not be built: {reason[0]}")
    paths = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    qemu = shutil.which("qemu-aarch64")
    assert qemu is not None  # checked in _host_problem
    return Arm64Env(
        sysroot=Path(paths["SYSROOT"]),
        wheels=Path(paths["WHEELS"]),
        cpuinfo_dir=Path(paths["CPUINFO_DIR"]),
        python=Path(paths["PYTHON"]),
        qemu=Path(qemu),
    )


#: Mount the ARM cpuinfo ($0) over the host's, in this mount namespace only, then run the command.
_MOUNT_THEN = 'mount --bind "$0" /proc/cpuinfo && exec "$@"'


def arm64_command(
    args: list[str], cpu: str, env: Arm64Env | None = None, cpuinfo: Path | None = None
) -> list[str]:
    """The host command that runs ``python3.11 ARGS`` on the emulated ``cpu`` (see the module doc).

    ``cpuinfo``: the text to show as ``/proc/cpuinfo`` (default: the emulated CPU's own). The
    command's environment must set ``ARM64_QEMU_CPU`` to ``cpu`` (:func:`run_arm64` does): the
    interpreter is ``python3.11-emulated``, which reads it.
    """
    env = env or arm64_env()
    return [
        "unshare",
        "-m",
        "sh",
        "-c",
        _MOUNT_THEN,
        str(cpuinfo or env.cpuinfo(cpu)),
        str(env.python),
        *args,
    ]


def guest_environ(extra: dict[str, str] | None = None, env: Arm64Env | None = None) -> dict[str, str]:
    """This process's environment for the guest: the wheels, then the checkout, and nothing of .venv's."""
    arm = env or arm64_env()
    # Bytecode goes to the cache (PYTHONPYCACHEPREFIX below), never into the checkout's __pycache__
    # (the host's): so it is kept even where the caller says PYTHONDONTWRITEBYTECODE, as emulated
    # imports are slow (pydantic, numpy) and compiling them at every start would be slower still.
    dropped = ("PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    environ = {k: v for k, v in os.environ.items() if k not in dropped}
    environ.update(
        {
            "PYTHONPATH": os.pathsep.join([str(arm.wheels), str(REPO)]),
            "PYTHONNOUSERSITE": "1",
            "PYTHONPYCACHEPREFIX": str(arm.sysroot.parent / "pycache"),
        }
    )
    environ.update(extra or {})
    return environ


def run_arm64(
    args: list[str],
    cpu: str,
    timeout_s: float | None = 900.0,
    *,
    extra_env: dict[str, str] | None = None,
    cpuinfo: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python3.11 ARGS`` (e.g. ``["-m", "edge_runtime.cli", "model", "verify"]``) on emulated ``cpu``.

    Runs from the repository root with its output captured as text; the exit status is the
    caller's to check. ``extra_env`` is added to this process's environment; ``cpuinfo`` replaces
    the emulated CPU's own ``/proc/cpuinfo`` text (e.g. one that claims what the CPU lacks).

    Raises:
        Arm64Unavailable: this host cannot emulate ARM64 (see :func:`arm64_env`).
        subprocess.TimeoutExpired: it ran past ``timeout_s``.
    """
    env = arm64_env()
    return subprocess.run(
        arm64_command(args, cpu, env, cpuinfo),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=REPO,
        env=guest_environ({"ARM64_QEMU_CPU": cpu, **(extra_env or {})}, env),
    )


if __name__ == "__main__":  # python -m benchmarks.arm64 [--cpu neoverse-n1] ARGS...: a quick try
    cpu = "neoverse-n1"
    argv = sys.argv[1:]
    if argv[:1] == ["--cpu"]:
        cpu, argv = argv[1], argv[2:]
    done = run_arm64(argv or ["-c", "import platform; print(platform.machine())"], cpu, None)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    raise SystemExit(done.returncode)
