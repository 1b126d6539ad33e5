"""Names the service's child processes as ``ps``, ``top`` and the admin's memory table show them.

Decoder and report children are forked from a ``forkserver`` whose command line they keep
(``python -c 'from multiprocessing.forkserver import main; ...'``), so without a name an admin
looking at a box's memory cannot tell which process is which. Linux keeps a 15-byte name per
process (``/proc/PID/comm``, set with ``prctl(PR_SET_NAME)``); ``ps -o comm``, ``top`` and
``htop`` show it. A leaf module (ctypes only): elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["DECODER", "REPORTS", "name_process"]

#: The names (at most 15 bytes: the kernel truncates the rest).
DECODER = "edge-decoder"
REPORTS = "edge-reports"

_PR_SET_NAME = 15


def name_process(name: str) -> bool:
    """Set this process's name (``/proc/self/comm``); False where the system has no such name."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
