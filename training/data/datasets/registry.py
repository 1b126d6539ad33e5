"""Which reader handles a path: detection, and the readers registered by kind.

A reader is a module with a ``read(root) -> _Source`` function, registered here
by kind and imported only when that kind is opened; adding one is a module plus
a line in :data:`READERS`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from .base import _POOL_FOLDERS, _TEST_FOLDER, FOLDERS, KINDS, NIH_SUBSET, NPZ, _Source
from .nih_subset import _is_nih_subset


def _detect(path: str | Path) -> tuple[str, Path]:
    """The kind of data at ``path`` and its root (the folder, or the ``.npz`` file)."""
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.suffix.lower() == ".npz":
        return NPZ, p
    if not p.is_dir():
        raise FileNotFoundError(f"Dataset path {p} does not exist (pass --data).")
    if any((p / name).is_dir() for name in (*_POOL_FOLDERS, _TEST_FOLDER)):
        return FOLDERS, p
    npzs = sorted(p.glob("*.npz"))
    if len(npzs) == 1:
        return NPZ, npzs[0]
    if len(npzs) > 1:
        raise ValueError(
            f"{p} holds several .npz files ({', '.join(n.name for n in npzs)}); pass one of them."
        )
    if _is_nih_subset(p):
        return NIH_SUBSET, p
    raise ValueError(
        f"Cannot tell what {p} holds: expected train/ and test/ folders with one folder per class, "
        "a PneumoniaMNIST .npz, or NIH ChestX-ray14 PNGs (00000001_000.png) in images/."
    )


#: ``kind -> module:function`` of each reader, imported when that kind is opened.
READERS: dict[str, str] = {
    FOLDERS: "training.data.datasets.folders:read",
    NPZ: "training.data.datasets.pneumoniamnist:read",
    NIH_SUBSET: "training.data.datasets.nih_subset:read",
}


def _read_source(kind: str, root: Path) -> _Source:
    """What ``root`` holds, read by the reader registered for ``kind``."""
    try:
        target = READERS[kind]
    except KeyError:
        raise ValueError(f"Unknown dataset kind {kind!r}; known kinds are {KINDS}.") from None
    module_name, _, function = target.partition(":")
    reader: Callable[[Path], _Source] = getattr(importlib.import_module(module_name), function)
    return reader(root)
