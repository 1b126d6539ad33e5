"""Files inside hidden folders of the inbox are a sender's business, never scans, with inotify too.

A sender may stage files in ``inbox/.store/`` and link them into the inbox. The
rescan pruned hidden folders, but the inotify path judged only a file's own name,
so ``.store/real.jpeg`` was offered as a scan: as a duplicate of the link it was
deleted, and the link then pointed at nothing (test_hostile_inputs' symlink test
failed about one run in ten, depending on which event came first).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edge_runtime.config import InboxConfig
from edge_runtime.sources.base import ScanItem
from edge_runtime.sources.inbox import InboxSource


def test_inotify_ignores_files_in_hidden_folders(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    config = InboxConfig(
        path=inbox,
        quarantine_path=tmp_path / "quarantine",
        settle_seconds=0.2,
        rescan_interval_seconds=3600.0,  # inotify alone: the rescan never runs during the test
        use_inotify=True,
    )
    offered: list[Path] = []
    seen = threading.Event()

    def on_ready(item: ScanItem) -> None:
        offered.append(item.path)
        if item.path.name == "visible.jpeg":
            seen.set()

    source = InboxSource(config)
    source.start(on_ready)
    try:
        time.sleep(0.3)  # the first rescan at start has run on the empty inbox
        (inbox / ".store").mkdir()
        (inbox / ".store" / "real.jpeg").write_bytes(b"staged")
        (inbox / "sub.part").mkdir()
        (inbox / "sub.part" / "inner.jpeg").write_bytes(b"in a folder with an ignored suffix")
        (inbox / "ward-3").mkdir()
        (inbox / "ward-3" / "visible.jpeg").write_bytes(b"a scan in a plain subfolder")
        assert seen.wait(10), f"the plain subfolder's scan was not offered (offered: {offered})"
        time.sleep(0.8)  # past the settle time of every file written above
    finally:
        source.stop()
    assert [p.relative_to(inbox).as_posix() for p in offered] == ["ward-3/visible.jpeg"]
