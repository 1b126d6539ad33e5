"""The inbox source on its own: a real folder, real files, the real watcher threads (no service).

A file is handed on once it is complete (unchanged for SettleSeconds, or renamed from NAME.part),
hidden, temporary and excluded files never are, a file handed on is not offered again until it is
released, and dispose() deletes it or moves it to ProcessedPath under a free name. unique_target
picks that free name (and the quarantine's).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.config import InboxConfig
from edge_runtime.sources.base import ScanItem
from edge_runtime.sources.inbox import InboxSource, unique_target


class Offers:
    """What the source handed on, in order, with a wait for the next ones."""

    def __init__(self) -> None:
        self.items: list[ScanItem] = []
        self.at: list[float] = []
        self._cond = threading.Condition()

    def __call__(self, item: ScanItem) -> None:
        with self._cond:
            self.items.append(item)
            self.at.append(time.monotonic())
            self._cond.notify_all()

    def wait(self, count: int, timeout_s: float = 5.0) -> list[ScanItem]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.items) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self.items)} of {count} files handed on: {self.names()}")
                self._cond.wait(remaining)
            return list(self.items)

    def names(self) -> list[str]:
        with self._cond:
            return [item.path.name for item in self.items]


@pytest.fixture()
def watch(tmp_path: Path) -> Iterator:
    """Start an InboxSource on ``tmp_path/inbox`` with the given settings; stopped at teardown."""
    sources: list[InboxSource] = []

    def start(**settings: object) -> tuple[InboxSource, Offers, Path]:
        inbox = tmp_path / "inbox"
        inbox.mkdir(exist_ok=True)
        values = {"path": inbox, "quarantine_path": tmp_path / "quarantine", **settings}
        source = InboxSource(InboxConfig(**values))
        offers = Offers()
        source.start(offers)
        sources.append(source)
        return source, offers, inbox

    yield start
    for source in sources:
        source.stop()


# -- unique_target ---------------------------------------------------------------------------


def test_unique_target_never_reuses_a_taken_name(tmp_path: Path) -> None:
    assert unique_target(tmp_path, "scan.dcm") == tmp_path / "scan.dcm"
    (tmp_path / "scan.dcm").write_bytes(b"1")
    assert unique_target(tmp_path, "scan.dcm") == tmp_path / "scan.1.dcm"
    (tmp_path / "scan.1.dcm").write_bytes(b"2")
    # An error file alone holds its name too (its scan may come back to sit beside it).
    (tmp_path / "scan.2.dcm.error.json").write_text("{}")
    assert unique_target(tmp_path, "scan.dcm") == tmp_path / "scan.3.dcm"
    (tmp_path / "notes").write_bytes(b"")
    assert unique_target(tmp_path, "notes") == tmp_path / "notes.1"
    assert [p.name for p in sorted(tmp_path.iterdir())] == [
        "notes",
        "scan.1.dcm",
        "scan.2.dcm.error.json",
        "scan.dcm",
    ]  # only looked, never wrote


def test_unique_target_reuses_the_name_an_interrupted_move_of_the_same_input_left(tmp_path: Path) -> None:
    (tmp_path / "scan.dcm").write_bytes(b"another input")
    (tmp_path / "scan.dcm.error.json").write_text('{"sha256": "aaa"}')
    (tmp_path / "scan.1.dcm.error.json").write_text('{"sha256": "bbb"}')
    asked: list[str] = []

    def same(error_file: Path) -> bool:
        asked.append(error_file.name)
        return "bbb" in error_file.read_text()

    assert unique_target(tmp_path, "scan.dcm", same) == tmp_path / "scan.1.dcm"
    assert asked == ["scan.dcm.error.json", "scan.1.dcm.error.json"]
    assert unique_target(tmp_path, "scan.dcm", lambda _: False) == tmp_path / "scan.2.dcm"


# -- what is handed on, and when --------------------------------------------------------------


def test_a_file_still_growing_is_handed_on_once_it_has_settled(watch) -> None:
    _source, offers, inbox = watch(settle_seconds=0.3, rescan_interval_seconds=0.1)
    path = inbox / "slow.dcm"
    with path.open("wb") as fh:
        for i in range(6):  # 0.75 s of writing, each pause shorter than the settle time
            if i:
                time.sleep(0.15)
            assert offers.names() == [], "handed on while still being written"
            fh.write(b"x" * 1000)
            fh.flush()
            last_write = time.monotonic()

    (item,) = offers.wait(1)
    assert item.path == path and item.size_bytes == 6000
    assert offers.at[0] - last_write >= 0.3  # unchanged for the settle time first
    time.sleep(0.3)
    assert offers.names() == ["slow.dcm"]  # once


def test_a_part_file_renamed_to_its_name_is_handed_on_without_the_settle_wait(watch) -> None:
    _source, offers, inbox = watch(settle_seconds=30.0, rescan_interval_seconds=0.2, use_inotify=True)
    part = inbox / "scan.dcm.part"
    part.write_bytes(b"complete by the sender's convention")
    time.sleep(0.4)
    assert offers.names() == []  # NAME.part is never a scan
    renamed = time.monotonic()
    part.rename(inbox / "scan.dcm")

    (item,) = offers.wait(1, timeout_s=5)
    assert item.path == inbox / "scan.dcm"
    assert offers.at[0] - renamed < 5  # not the 30 s settle time


def test_hidden_temporary_and_excluded_files_are_never_handed_on(watch, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for folder in (".store", "quarantine", "processed", "ward.tmp"):
        (inbox / folder).mkdir(parents=True)
    ignored = [
        ".hidden.dcm",
        "a.dcm.part",
        "b.tmp",
        "c.swp",
        "d.dcm.error.json",
        ".store/staged.dcm",
        "quarantine/bad.dcm",
        "processed/old.dcm",
        "ward.tmp/inner.dcm",
    ]
    for name in [*ignored, "visible.dcm", "ward-3/also.dcm"]:
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        (inbox / name).write_bytes(b"data")

    _source, offers, _ = watch(
        settle_seconds=0.1,
        rescan_interval_seconds=0.1,
        quarantine_path=inbox / "quarantine",
        processed_path=inbox / "processed",
    )
    offers.wait(2)
    time.sleep(0.5)  # several more rescans
    assert sorted(item.path.relative_to(inbox).as_posix() for item in offers.items) == [
        "visible.dcm",
        "ward-3/also.dcm",
    ]
    assert all((inbox / name).exists() for name in ignored)  # left alone, not deleted


def test_files_waiting_at_start_are_handed_on_oldest_first(watch, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    now = time.time()
    for name, age in (("middle.dcm", 200), ("newest.dcm", 100), ("oldest.dcm", 300)):
        (inbox / name).write_bytes(b"data")
        os.utime(inbox / name, (now - age, now - age))

    _source, offers, _ = watch(settle_seconds=0.1, rescan_interval_seconds=5.0, use_inotify=False)

    offers.wait(3)
    assert offers.names() == ["oldest.dcm", "middle.dcm", "newest.dcm"]


# -- release and dispose ----------------------------------------------------------------------


def test_a_file_handed_on_is_offered_again_only_after_release(watch) -> None:
    source, offers, inbox = watch(settle_seconds=0.1, rescan_interval_seconds=0.1)
    (inbox / "scan.dcm").write_bytes(b"data")
    (first,) = offers.wait(1)
    time.sleep(0.5)  # rescans find it every 0.1 s: it is claimed, so not offered again
    assert offers.names() == ["scan.dcm"]

    source.release(first)  # its outcome is recorded, the file is still there: new work

    second = offers.wait(2)[1]
    assert second.path == first.path


def test_dispose_deletes_the_file_without_a_processed_folder(watch) -> None:
    source, offers, inbox = watch(settle_seconds=0.1, rescan_interval_seconds=0.1)
    (inbox / "scan.dcm").write_bytes(b"data")
    (item,) = offers.wait(1)

    source.dispose(item)
    assert not item.path.exists()
    source.dispose(item)  # already gone: nothing to do, no error
    assert list(inbox.iterdir()) == []


def test_dispose_moves_the_file_to_the_processed_folder_under_a_free_name(watch, tmp_path: Path) -> None:
    processed = tmp_path / "processed"
    source, offers, inbox = watch(settle_seconds=0.1, rescan_interval_seconds=0.1, processed_path=processed)
    assert processed.is_dir()  # created at start
    (processed / "scan.dcm").write_bytes(b"an earlier scan")
    (inbox / "scan.dcm").write_bytes(b"this scan")
    (item,) = offers.wait(1)

    source.dispose(item)

    assert not item.path.exists()
    assert (processed / "scan.dcm").read_bytes() == b"an earlier scan"
    assert (processed / "scan.1.dcm").read_bytes() == b"this scan"
