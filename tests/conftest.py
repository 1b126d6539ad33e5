"""Shared fixtures and hooks: real data, a real Mosquitto broker, real (tiny or bundled) models.

Only fixtures and pytest hooks live here; the helpers they and the tests use (functions, classes,
constants) are in helpers.py, which test modules import (never this file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    SHARED_DATA,
    TEST_TRUSTED_KEYS,
    Broker,
    Subscriber,
    is_dicom_file,
    make_tiny_bundle,
    need_keras_route,
    train_tiny_keras,
    training_cli,
)


def pytest_configure(config: pytest.Config) -> None:
    """This interpreter's scripts (cfn-lint, edge-runtime) first on PATH, as an activated venv has.

    The README runs the suite as ``.venv/bin/python -m pytest``, without activating the venv;
    tests and the processes they start look tools up on PATH.
    """
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if scripts not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, path]) if path else scripts


# -- bundle signing ------------------------------------------------------------------------
# The session's test key (helpers.TEST_SIGNING_KEY, generated when helpers is imported, never
# committed) signs every tiny bundle. The session's configured trust is the bundled models' key
# plus that one, set the way a site sets it (EDGE_RUNTIME__MODEL__TRUSTED_KEYS), so load_bundle()
# and the service subprocesses believe tiny bundles while unsigned and tampered ones are still
# refused. Tests about signing pass their own BundleTrust.
os.environ["EDGE_RUNTIME__MODEL__TRUSTED_KEYS"] = json.dumps(TEST_TRUSTED_KEYS)
# Services the tests start (in this process or as subprocesses) serve their admin page on any free
# port, so two of them, or one a developer runs beside the suite, never fight over 8380.
os.environ["EDGE_RUNTIME__ADMIN__PORT"] = "0"


@pytest.fixture(scope="session", autouse=True)
def every_sr_written_passes_the_dicom_validators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session, every ``sr.dcm`` any test wrote passes dciodvfy and dsrdump.

    The tests that build reports from quirky headers check their own SRs; this holds every
    other SR the suite writes (service runs, deliveries, chaos) to the same standard, so an
    SR that DICOM tools reject cannot be written anywhere without a failure. A failure shows
    as an error in the session's teardown, naming each file and what the tool said.
    """
    yield
    dciodvfy, dsrdump = shutil.which("dciodvfy"), shutil.which("dsrdump")
    if dciodvfy is None or dsrdump is None:
        return  # .ci/setup installs both (dicom3tools, dcmtk); the report tests say so when absent
    problems = []
    # DICOM files only: retention tests write placeholder report folders.
    srs = [p for p in sorted(tmp_path_factory.getbasetemp().rglob("sr.dcm")) if is_dicom_file(p)]
    for sr in srs:
        checked = subprocess.run([dciodvfy, str(sr)], capture_output=True, text=True, check=False)
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        dumped = subprocess.run([dsrdump, str(sr)], capture_output=True, text=True, check=False)
        if errors or dumped.returncode != 0:
            problems.append(f"{sr}: {'; '.join(errors) or dumped.stderr.strip()[:300]}")
    listing = "\n".join(problems)
    assert not problems, f"{len(problems)} of {len(srs)} SRs written by the suite fail:\n{listing}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real X-rays and DICOM), or skip: it is not shipped with the repo."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (it lives beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Broker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture()
def subscriber_factory(mosquitto: Broker) -> Iterator:
    subs: list[Subscriber] = []

    def make(topic: str = "#") -> Subscriber:
        sub = Subscriber(mosquitto, topic)
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.close()


@pytest.fixture()
def tiny_bundle(tmp_path: Path) -> Path:
    return make_tiny_bundle(tmp_path / "tiny-bundle")


@pytest.fixture(scope="session")
def default_bundle() -> Path:
    from edge_runtime.bundle import default_bundle_path

    path = default_bundle_path()
    if not (path / "manifest.json").is_file():
        pytest.skip(f"bundled default model not present at {path}")
    return path


@pytest.fixture(scope="session")
def keras_bundle(default_bundle: Path) -> Path:
    """The bundle the Keras route trained (issue 29), committed beside the default one."""
    path = default_bundle.parent / "pneumonia-cxr-keras"
    if not (path / "manifest.json").is_file():
        pytest.fail(f"the Keras-route bundle is missing from {path}")
    return path


@pytest.fixture(params=["pneumonia-cxr", "pneumonia-cxr-keras"])
def shipped_bundle(request: pytest.FixtureRequest, default_bundle: Path) -> Path:
    """Each bundle shipped in edge_runtime/models/: the PyTorch route's default and the Keras route's."""
    if request.param == "pneumonia-cxr":
        return default_bundle
    return Path(request.getfixturevalue("keras_bundle"))


@pytest.fixture(scope="session")
def tiny_keras_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny Keras training run for the session (its folder and the command's output).

    test_keras_training.py reads it; test_keras_export.py exports from a copy of it. Trained once:
    the run takes most of both files' time.
    """
    need_keras_route()
    pytest.importorskip("torch", reason="torch (training extra) not installed")
    folder = tmp_path_factory.mktemp("keras-tiny") / "run"
    done = train_tiny_keras(folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, done.stdout


@pytest.fixture(scope="session")
def tiny_keras_export(
    tiny_keras_run: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """A copy of the tiny Keras run after ``export --framework keras`` (its folder and the output).

    test_keras_export.py checks the export; test_keras_bundle.py packages a copy of it.
    """
    import shutil

    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed")
    folder = tmp_path_factory.mktemp("keras-export") / "run"
    shutil.copytree(tiny_keras_run[0], folder)
    done = training_cli("export", "--framework", "keras", "--out", str(folder))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, done.stdout
