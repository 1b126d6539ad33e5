"""A full disk costs reports, never results; a negative scan's heat-map is muted and says so.

Disk full, on a real file system that fills: a 4 MiB tmpfs mounted in a
private mount namespace (``unshare -m``, so nothing outside this test sees
it) holds Reports.Path and the health file, and is filled the way a disk
fills. The service runs in that namespace as an admin runs it (``edge-runtime
run``); its results are read from a real broker, and ``edge-runtime health``
runs inside the same namespace (``nsenter``). Where mounting is not
permitted (no root, no CAP_SYS_ADMIN, a container without it) the tests skip
and say so.

Heat-map: the rule in :mod:`edge_runtime.reports.heatmap` (red means a
finding) measured on the pixels, and the decision line found on the image
by template matching against the expected text.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from edge_runtime.errors import public_text
from edge_runtime.reports.heatmap import CAUTION, decision_text, heat_scale, overlay
from tests.helpers import chest_dicom_from_jpeg

#: A paediatric chest radiograph as a modality sends it (a Kermany image as CR, a child's birth
#: date): within the bundled model's intended use, so its result has a decision and a heat-map.
CHILD_JPEG = "cxr/kermany_pneumonia_224/test/PNEUMONIA/person1_virus_6.jpeg"
SIIM_CR = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
NEGATIVE = {"label": "PNEUMONIA", "probability": 0.23, "threshold": 0.93, "positive": False}
POSITIVE = {"label": "PNEUMONIA", "probability": 0.97, "threshold": 0.93, "positive": True}
#: Mount a tmpfs on "$0" in a private mount namespace, then run the rest of the command there.
MOUNT_THEN = 'mount -t tmpfs -o size={size} tmpfs "$0" && mkdir -p "$0/reports" && exec "$@"'


def _in_tmpfs(volume: Path, *command: str, size: str = "4m") -> list[str]:
    """``command`` run in a private mount namespace where a tmpfs of ``size`` is mounted on ``volume``."""
    return ["unshare", "-m", "sh", "-c", MOUNT_THEN.format(size=size), str(volume), *command]


def _tmpfs_or_skip(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(
        _in_tmpfs(probe, "true", size="64k"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {done.stderr.strip()}")


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder/filler`` until the file system says ENOSPC."""
    filler = folder / "filler"
    block = b"\0" * 65536
    with filler.open("wb", buffering=0) as handle:
        for size in (65536, 4096, 1):
            try:
                while True:
                    handle.write(block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


@pytest.fixture(scope="module")
def child_cr(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chest_dicom_from_jpeg(shared_data / CHILD_JPEG, tmp_path_factory.mktemp("child") / "child.dcm")


def _scan(child_cr: Path, dst: Path) -> str:
    """The chest CR with new Study, Series and SOP Instance UIDs: another scan. Returns its SOP UID."""
    ds = pydicom.dcmread(child_cr)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    part = dst.with_name(dst.name + ".part")
    ds.save_as(part, enforce_file_format=True)
    part.rename(dst)
    return str(ds.SOPInstanceUID)


# -- a full disk: the writer and the report processes -----------------------------------------

_PROCESSES_SCRIPT = r"""
import json, logging, sys
from pathlib import Path
from edge_runtime.config import RuntimeConfig
from edge_runtime.pipeline import ScanAnalyzer
from edge_runtime.reports.processes import ReportProcesses
from edge_runtime.results import ScanResult

volume, bundle, scan = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
events = []
class Keep(logging.Handler):
    def emit(self, record):
        events.append([getattr(record, "event", None), record.levelname, record.getMessage()])
logging.getLogger("edge_runtime").addHandler(Keep())
logging.getLogger("edge_runtime").setLevel(logging.DEBUG)
config = RuntimeConfig.from_mapping(
    {"Journal": {"Path": str(volume.parent / "state" / "journal.sqlite3")},
     "Reports": {"Path": str(volume / "reports")}})
analyzer = ScanAnalyzer.from_bundle_path(bundle)
outcome = analyzer.analyze(scan)
analyzer.close()
reports = ReportProcesses(1)
def write():
    result = ScanResult.of(outcome.analysis, message_id=f"{len(links):02x}" + "0" * 62, priority="routine")
    written = reports.write(config, result, outcome.header, image=outcome.image, heatmap=outcome.heatmap)
    return None if written is None else written.model_dump(exclude_none=True)
links = []
links.append(write())                                  # room: written
filler = volume / "filler"
with filler.open("wb", buffering=0) as handle:
    for size in (65536, 4096, 1):
        try:
            while True:
                handle.write(b"\0" * size)
        except OSError:
            pass
for _ in range(3):
    links.append(write())                              # full: one try, then paused
left = sorted(str(p.relative_to(volume / "reports")) for p in (volume / "reports").rglob("*"))
filler.unlink()
links.append(write())                                  # space back: resumed
reports.close()
print(json.dumps({"links": links, "events": events, "left": left}))
"""


def test_a_full_disk_costs_the_reports_once_then_pauses_them_until_space_is_back(
    child_cr: Path, default_bundle: Path, tmp_path: Path
) -> None:
    _tmpfs_or_skip(tmp_path)
    volume, scan = tmp_path / "volume", child_cr
    volume.mkdir()
    script = [sys.executable, "-c", _PROCESSES_SCRIPT, str(volume), str(default_bundle), str(scan)]
    done = subprocess.run(
        _in_tmpfs(volume, *script),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    links, events = out["links"], out["events"]
    assert "error" not in links[0] and {"sr", "fhir", "heatmap_png", "heatmap_dicom"} <= set(links[0])
    for full in links[1:4]:
        assert full == {
            "folder": full["folder"],
            "error_code": "disk_full",
            "error": public_text("disk_full"),
        }
    assert "error" not in links[4] and "sr" in links[4]  # resumed by itself
    # Nothing half-written is left behind: the first result's files, no folder or .part of the others.
    first = links[0]["folder"]
    names = ("fhir.json", "heatmap.dcm", "heatmap.png", "sr.dcm")
    assert out["left"] == [first, *(f"{first}/{name}" for name in names)]
    # One try at the full disk (an ERROR naming it), one WARNING that reports pause, then nothing
    # per scan but a DEBUG line, and one INFO line when they resume.
    named = [e for e in events if e[0] in ("reports_paused", "reports_resumed")]
    assert [(e[0], e[1]) for e in named] == [("reports_paused", "WARNING"), ("reports_resumed", "INFO")]
    errors = [e for e in events if e[1] == "ERROR"]
    assert len(errors) == 1 and "disk_full" in errors[0][2], errors
    assert sum("skipped: the disk is still full" in e[2] for e in events) == 2


def test_a_full_disk_publishes_the_results_quarantines_nothing_and_health_says_disk_full(
    child_cr: Path, default_bundle: Path, mosquitto, subscriber_factory, tmp_path: Path
) -> None:
    """The issue's case, end to end: reports and health.json on a disk that fills while the service runs."""
    _tmpfs_or_skip(tmp_path)
    volume = tmp_path / "volume"
    volume.mkdir()
    prefix = f"diskfull/{tmp_path.name}"
    sub = subscriber_factory(f"{prefix}/#")
    env = dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(default_bundle),
        EDGE_RUNTIME__MQTT__HOST=mosquitto.host,
        EDGE_RUNTIME__MQTT__PORT=str(mosquitto.port),
        EDGE_RUNTIME__MQTT__TOPIC_PREFIX=prefix,
        EDGE_RUNTIME__MQTT__CLIENT_ID=f"edge-{tmp_path.name}",
        EDGE_RUNTIME__INBOX__SETTLE_SECONDS="0.3",
        EDGE_RUNTIME__HEALTH__HEARTBEAT_SECONDS="1",
        EDGE_RUNTIME__HEALTH__FILE=str(volume / "health.json"),
        EDGE_RUNTIME__REPORTS__PATH=str(volume / "reports"),
        EDGE_RUNTIME__WORKERS="1",
    )
    log_path = tmp_path / "service.log"
    with log_path.open("w") as log_file:
        service = subprocess.Popen(
            _in_tmpfs(volume, sys.executable, "-m", "edge_runtime.cli", "run"),
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    # unshare and sh exec: this pid is the service, and /proc/<pid>/root is its view of the files.
    seen = Path(f"/proc/{service.pid}/root") / str(volume).lstrip("/")
    inbox = tmp_path / "inbox"

    health_command = [sys.executable, "-m", "edge_runtime.cli", "health"]

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(service.pid), "-m", f"--wd={tmp_path}", *health_command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def result_of(sop_uid: str) -> dict:
        sub.wait_for(lambda ps: any(p.get("input", {}).get("sop_instance_uid") == sop_uid for p in ps), 60)
        return next(r for r in sub.results() if r["input"].get("sop_instance_uid") == sop_uid)

    try:
        sub.wait_for(lambda ps: any(p.get("state") == "online" for p in ps), timeout_s=90)
        room = result_of(_scan(child_cr, inbox / "a.dcm"))
        assert "error" not in room["reports"] and "sr" in room["reports"]
        assert health().returncode == 0
        filler = _fill(seen)
        full_at = time.monotonic()
        uids = [_scan(child_cr, inbox / f"{name}.dcm") for name in ("b", "c", "d")]
        for uid in uids:
            reports = result_of(uid)["reports"]
            assert reports["error_code"] == "disk_full" and reports["error"] == public_text("disk_full")
        # The health file is stale (3 heartbeats) because the disk is full: health says so.
        time.sleep(max(0.0, full_at + 4.0 - time.monotonic()))
        stale = health()
        assert stale.returncode == 1
        assert "disk full" in stale.stderr and "hung or stopped" not in stale.stderr, stale.stderr
        assert "Free space there" in stale.stderr
        # Space back: reports resume by themselves, and so does the health file.
        filler.unlink()
        again = result_of(_scan(child_cr, inbox / "e.dcm"))
        assert "error" not in again["reports"] and "sr" in again["reports"]
        deadline = time.monotonic() + 15
        while (back := health()).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert back.returncode == 0, back.stderr
        assert json.loads(back.stdout)["counters"]["quarantined"] == 0
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)
    log = log_path.read_text()
    assert service.returncode == 0, log
    # Nothing was quarantined or retried: five scans, five results, an empty quarantine.
    assert len(sub.results()) == 5
    quarantine = tmp_path / "quarantine"
    assert not quarantine.exists() or not any(quarantine.iterdir())
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    names = [e.get("event") for e in events]
    assert names.count("reports_paused") == 1 and names.count("reports_resumed") == 1, log
    # One scan tried the full disk; the two after it were not tried again (no ERROR for them).
    not_written = [e for e in events if "not written" in e.get("msg", "") and e.get("level") == "ERROR"]
    assert len(not_written) == 1, not_written
    assert "processing_failed_repeatedly" not in log


# -- the heat-map: scaled to the finding, the decision written on it --------------------------


@pytest.fixture(scope="module")
def chest(shared_data: Path) -> np.ndarray:
    from edge_runtime.decode import decode_file

    return decode_file(shared_data / SIIM_CR).pixels


#: The hottest cell bottom-right, the rest cold: where the colour must show (or not).
HOT_CORNER = np.array([[0, 0, 0], [0, 0.3, 0.2], [0, 0.4, 1]], dtype=np.float32)


def _band_rows(rgb: np.ndarray) -> int:
    """Rows of the dark caption band in the top-left corner (black at column 1)."""
    column = rgb[:, 1].astype(int).sum(axis=1)
    return int(np.argmax(column > 0))


def test_the_rule_negative_muted_positive_full(chest: np.ndarray) -> None:
    assert heat_scale(POSITIVE) == 1.0
    assert heat_scale(NEGATIVE) == pytest.approx(0.5 * 0.23 / 0.93)
    assert heat_scale({**NEGATIVE, "probability": 0.929}) < 0.5  # never the upper (red) half
    plain = overlay(chest, np.zeros((3, 3), np.float32), max_side=512).astype(int)
    negative = overlay(chest, HOT_CORNER, max_side=512, finding=NEGATIVE).astype(int)
    positive = overlay(chest, HOT_CORNER, max_side=512, finding=POSITIVE).astype(int)
    below = max(_band_rows(negative), _band_rows(positive)) + 1

    def redness(rgb: np.ndarray) -> int:
        return int((rgb[below:, :, 0] - (rgb[below:, :, 1] + rgb[below:, :, 2]) // 2).max())

    # Negative (P 0.23 < 0.93): the hottest cell at 0.12 of the scale, blended at 0.06: no pixel
    # redder than the radiograph under it, and none more than 0.06 x 255 (+1 rounding) off it.
    assert redness(negative) <= redness(plain) + 1
    assert np.abs(negative[below:] - plain[below:]).max() <= 17
    # Positive: full scale, red in the hot corner, blended at 0.5.
    hot = positive[-40:, -40:]
    assert redness(positive) >= 80 and (hot[..., 0] - hot[..., 2]).mean() > 60
    assert np.abs(positive[below:] - plain[below:]).max() >= 100


def _score(rgb: np.ndarray, text: str) -> float:
    """How well ``text``, drawn as the caption draws it, matches the best place in the top band."""
    scale = max(0.3, min(rgb.shape[:2]) / 700.0)
    thickness = max(1, round(scale * 1.5))
    (width, height), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    template = np.zeros((height + base + 4, width + 4), np.uint8)
    cv2.putText(template, text, (2, height + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA)
    band = cv2.cvtColor(np.ascontiguousarray(rgb[: _band_rows(rgb) + 4]), cv2.COLOR_RGB2GRAY)
    return float(cv2.matchTemplate(band, template, cv2.TM_CCOEFF_NORMED).max())


def test_the_decision_is_written_on_the_image(chest: np.ndarray) -> None:
    assert decision_text(NEGATIVE) == "P(PNEUMONIA) 0.23 < 0.93: no finding"
    assert decision_text(POSITIVE) == "P(PNEUMONIA) 0.97 >= 0.93: PNEUMONIA"
    # Two decimals would read "0.93 < 0.93": as many as it takes.
    assert decision_text({**NEGATIVE, "probability": 0.925}) == "P(PNEUMONIA) 0.925 < 0.930: no finding"
    without = overlay(chest, HOT_CORNER, max_side=512)
    negative = overlay(chest, HOT_CORNER, max_side=512, finding=NEGATIVE)
    positive = overlay(chest, HOT_CORNER, max_side=512, finding=POSITIVE)
    # The band grew by a line; below it the image is what the map alone draws (same scale for positive).
    assert _band_rows(negative) > _band_rows(without) + 10
    below = _band_rows(positive) + 1
    assert np.array_equal(positive[below:], without[below:])
    # Each image carries its own decision and the caution, and not the other decision.
    for rgb, right, wrong in ((negative, NEGATIVE, POSITIVE), (positive, POSITIVE, NEGATIVE)):
        assert _score(rgb, CAUTION) > 0.95
        assert _score(rgb, decision_text(right)) > 0.95
        assert _score(rgb, decision_text(wrong)) < 0.85
    # Deterministic: the same inputs, the same pixels.
    assert np.array_equal(negative, overlay(chest, HOT_CORNER, max_side=512, finding=NEGATIVE))
