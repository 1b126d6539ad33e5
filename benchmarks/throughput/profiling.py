"""py-spy around a drop into the subprocess service (``--profile``), and where its samples fall.

Apart because it is optional (py-spy may be missing) and runs after the scale part, so that its
sampling does not disturb those numbers; the summary sorts samples by function and by the
service thread they belong to.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.throughput.common import say
from benchmarks.throughput.inputs import CopyMaker, n_for
from benchmarks.throughput.services import ServiceProcess, Subscriber


def start_pyspy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    binary = shutil.which("py-spy")
    if binary is None:
        return None
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            "100",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_pyspy(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return next((line for line in reversed(lines) if "Samples" in line), lines[-1] if lines else "")


def summarise_profile(path: Path, top: int = 18) -> dict[str, Any]:
    """Self and inclusive samples per function (py-spy 'raw' collapsed stacks), and per thread role."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _split_frames(stack)
        # py-spy --subprocesses: one 'process PID:"cmd"' frame per generation ahead of the code
        procs = list(itertools.takewhile(lambda f: f.startswith("process "), frames))
        code = [f for f in frames[len(procs) :] if not _boring(f)]
        who = "service" if len(procs) <= 1 else "decoder child"
        total += count
        threads[f"{who}: {_thread_role(code) or 'other'}"] += count
        if code:
            self_c[_short(code[-1])] += count
            for frame in {_short(f) for f in code}:
                incl[frame] += count
    return {
        "samples": total,
        "self": self_c.most_common(top),
        "inclusive": incl.most_common(top),
        "threads": threads.most_common(12),
    }


def _split_frames(stack: str) -> list[str]:
    """Split on ';' except inside a quoted command line (which may contain ';')."""
    frames: list[str] = []
    for token in stack.split(";"):
        if frames and frames[-1].count('"') % 2:
            frames[-1] += ";" + token
        else:
            frames.append(token)
    return frames


_BORING = ("threading.py", "multiprocessing/", "runpy.py", "(<string>", "contextlib.py")


def _boring(frame: str) -> bool:
    """Frames every stack has (thread and process bootstrap): left out of the summary."""
    return any(marker in frame for marker in _BORING) or frame.startswith(" main(")


def _short(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py)'."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    parts = Path(file).parts
    return f"{name} ({'/'.join(parts[-2:])})"


def _thread_role(code: list[str]) -> str:
    """Which service thread a stack belongs to, from its frames."""
    text = ";".join(code[:8])
    for marker, role in (
        ("_work (", "worker"),
        ("_loop (edge_runtime/sinks", "drainer"),
        ("drainer.py", "drainer"),
        ("inbox.py", "inbox"),
        ("_child_main", "decoder"),
        ("decode_file", "decoder"),
        ("health.py", "heartbeat"),
        ("paho", "mqtt network"),
        ("watchdog", "inotify"),
    ):
        if marker in text:
            return role
    return ""


def profile_drops(
    args: argparse.Namespace,
    service: ServiceProcess,
    subscriber: Subscriber,
    maker: CopyMaker,
    kinds: list[str],
    n: int,
    out_dir: Path,
) -> dict[str, Any]:
    assert service.proc is not None
    if shutil.which("py-spy") is None:
        say("  skipped the profile: py-spy not found (pip install py-spy)")
        return {"skipped": "py-spy not found"}
    profiles: dict[str, Any] = {}
    plan = [("jpeg", n)]
    if "uncompressed" in kinds:
        plan.append(("uncompressed", max(8, n_for(args, "uncompressed"))))
    for key, count in plan:
        path = out_dir / f"profile-{key}.txt"
        spy = start_pyspy(service.proc.pid, path)
        assert spy is not None
        time.sleep(1.0)  # py-spy attached
        drop = service.drop(subscriber, maker.many(key, count), timeout_s=120 + 5 * count)
        note = stop_pyspy(spy)
        if not path.is_file():
            say(f"  profile of {key} failed: {note}")
            profiles[key] = {"error": note}
            continue
        summary = summarise_profile(path)
        summary.update(
            {"file": str(path), "n": count, "scans_per_s_under_py_spy": count / drop.elapsed, "py_spy": note}
        )
        profiles[key] = summary
    return profiles
