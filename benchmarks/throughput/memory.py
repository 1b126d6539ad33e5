"""Memory of the service's process tree (the service and its decoder children), sampled over time.

Apart because the peak RSS target counts every process of the tree, read with psutil where it
is installed and from ``/proc`` otherwise (PSS and VmHWM from ``/proc`` in both cases).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

try:
    import psutil
except ImportError:  # read /proc instead
    psutil = None

#: Whether psutil lists the process tree (printed, and recorded as the memory method).
HAS_PSUTIL = psutil is not None


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            return [pid, *(c.pid for c in proc.children(recursive=True))]
        except psutil.Error:
            return []
    children = _proc_children()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemorySampler:
    """RSS (and VmHWM, PSS) of a process and all its descendants, every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        #: (perf_counter, processes, sum RSS MB, sum PSS MB or nan, sum VmHWM MB)
        self.samples: list[tuple[float, int, float, float, float]] = []
        self.peak_rss_by_pid: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        pids = process_tree(self.pid)
        rss = hwm = pss = 0.0
        pss_ok = True
        for p in pids:
            kb = _status_kb(p)
            rss += kb.get("VmRSS", 0) / 1024
            hwm += kb.get("VmHWM", 0) / 1024
            self.peak_rss_by_pid[p] = max(self.peak_rss_by_pid.get(p, 0.0), kb.get("VmRSS", 0) / 1024)
            value = _pss_kb(p)
            pss_ok = pss_ok and value is not None
            pss += (value or 0) / 1024
        if pids:
            self.samples.append((time.perf_counter(), len(pids), rss, pss if pss_ok else float("nan"), hwm))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> dict[str, float]:
        rows = [s for s in self.samples if since <= s[0] <= until]
        if not rows:
            return {}
        pss = [s[3] for s in rows if not np.isnan(s[3])]
        return {
            "rss_mb": max(s[2] for s in rows),
            "pss_mb": max(pss) if pss else float("nan"),
            "hwm_sum_mb": max(s[4] for s in rows),
            "processes": max(s[1] for s in rows),
        }
