"""Shared fixtures: real data, a real Mosquitto broker, real (tiny or bundled) models."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_runtime.signing import bundled_models_key_path, generate_signing_key

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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
# One P-256 key for the whole session (generated here, never committed) signs every tiny
# bundle, as `training package --signing-key` would. The session's configured trust is the
# bundled models' key plus this one, set the way a site sets it (EDGE_RUNTIME__MODEL__TRUSTED_KEYS),
# so load_bundle() and the service subprocesses believe tiny bundles while unsigned and
# tampered ones are still refused. Tests about signing pass their own BundleTrust.
_KEY_DIR = Path(tempfile.mkdtemp(prefix="healthdiag-test-keys-"))
atexit.register(shutil.rmtree, _KEY_DIR, ignore_errors=True)
TEST_SIGNING_KEY, TEST_PUBLIC_KEY, TEST_KEY_FINGERPRINT = generate_signing_key(_KEY_DIR, "test-signing")
#: Model.TrustedKeys for tests that build their configuration as a mapping (no environment).
TEST_TRUSTED_KEYS = [str(bundled_models_key_path()), str(TEST_PUBLIC_KEY)]
os.environ["EDGE_RUNTIME__MODEL__TRUSTED_KEYS"] = json.dumps(TEST_TRUSTED_KEYS)


def sign_bundle(folder: Path, key: Path = TEST_SIGNING_KEY) -> Path:
    """Sign ``folder``'s manifest as it is now (after a test rewrote it on purpose)."""
    from edge_runtime.signing import load_private_key, sign_manifest

    sign_manifest(folder, load_private_key(key))
    return folder


def _is_dicom_file(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(132)[128:] == b"DICM"


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
    srs = [p for p in sorted(tmp_path_factory.getbasetemp().rglob("sr.dcm")) if _is_dicom_file(p)]
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


def dcmtk(tool: str) -> str:
    """dcmtk's binary (pynetdicom installs Python apps of the same names earlier on PATH)."""
    for candidate in (f"/usr/bin/{tool}", shutil.which(tool)):
        if candidate and Path(candidate).is_file():
            done = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False)
            if "dcmtk" in (done.stdout + done.stderr).lower():
                return candidate
    pytest.skip(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing accepted connections on 127.0.0.1:{port}")


class Broker:
    """A real Mosquitto on a free loopback port with a config in a temp dir."""

    def __init__(self, workdir: Path, extra_config: str = "", allow_anonymous: bool = True) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.extra_config = extra_config
        self.allow_anonymous = allow_anonymous
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        anonymous = "true" if self.allow_anonymous else "false"
        # As root, mosquitto drops to user `mosquitto`, which cannot read pytest's 0700
        # temp dirs (keys, password files, log): stay root for tests.
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"{user}listener {self.port} 127.0.0.1\n{self.extra_config}\n"
            f"allow_anonymous {anonymous}\npersistence false\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\nlog_type error\nlog_type warning\n"
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Broker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


class Subscriber:
    """A real MQTT subscriber that records every message on a topic filter."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: list[tuple[str, dict, bool]] = []
        self.urgent: list[dict] = []
        self.fhir: list[dict] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{time.monotonic_ns()}"
        )
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("test subscriber could not subscribe")

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            entry = (msg.topic, json.loads(msg.payload), bool(msg.retain))
            # The priority and FHIR topics repeat a result in other forms: kept apart, so a
            # test counting results on <prefix>/# sees each result once.
            if msg.topic.endswith("/results/urgent"):
                self.urgent.append(entry[1])
            elif msg.topic.endswith("/fhir"):
                self.fhir.append(entry[1])
            else:
                self.messages.append(entry)
            self._cond.notify_all()

    def wait_for_list(self, name: str, count: int, timeout_s: float = 30.0) -> list[dict]:
        """Wait until ``urgent`` or ``fhir`` holds ``count`` payloads."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(getattr(self, name)) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{name}: saw {len(getattr(self, name))} of {count}")
                self._cond.wait(remaining)
            return list(getattr(self, name))

    def wait_for(self, predicate, timeout_s: float = 30.0) -> list[dict]:
        """Wait until ``predicate(payloads)`` is true; returns the payloads seen."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                payloads = [m[1] for m in self.messages]
                if predicate(payloads):
                    return payloads
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met; saw {len(payloads)} messages")
                self._cond.wait(remaining)

    def results(self) -> list[dict]:
        with self._cond:
            return [m[1] for m in self.messages if m[1].get("message_type") == "result"]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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


def make_tiny_bundle(
    folder: Path,
    *,
    version: str = "0.0.1",
    conformance: bool = False,
    drift: float = 0.0,
    margin: float = 0.02,
    signed: bool = True,
) -> Path:
    """A real (tiny) ONNX classifier bundle: mean intensity -> 2-class softmax.

    Bright images score PNEUMONIA. Small enough to build in milliseconds, so
    tests that are about plumbing do not depend on the bundled model. With
    ``conformance`` it carries a reference set of 8 grey levels whose
    references ONNX Runtime computes here; ``drift`` is taken off the last
    (brightest) reference, as if this CPU computed that much differently
    from the build machine. ``signed``: signed with the session's test key
    (trusted by the session's configuration), else no ``manifest.sig.json``.
    """
    import onnx
    from onnx import TensorProto, helper

    from edge_runtime.bundle import write_manifest
    from edge_runtime.preprocess import PreprocessSpec

    spec = PreprocessSpec(height=64, width=64)
    folder.mkdir(parents=True, exist_ok=True)
    w = np.array([[-4.0, 4.0], [0, 0], [0, 0]], dtype=np.float32)
    b = np.array([0.0, 0.0], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.flatten()),
            helper.make_tensor("b", TensorProto.FLOAT, b.shape, b),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    extra: dict = {}
    if conformance:
        import onnxruntime as ort

        from edge_runtime.preprocess import preprocess

        levels = np.linspace(0.1, 0.9, 8)
        images = np.stack([np.full((64, 64), round(v * 255), dtype=np.uint8) for v in levels])
        x = np.stack([preprocess(img.astype(np.float32) / np.float32(255), spec) for img in images])
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        reference = session.run(None, {"input": x})[0][:, 1].astype(np.float32)
        reference[-1] -= drift
        np.savez_compressed(
            folder / "conformance.npz",
            images=images,
            labels=(levels > 0.5).astype(np.int8),
            reference=reference,
            sources=np.asarray([f"grey-{i}.png" for i in range(8)], dtype="<U64"),
        )
        extra["conformance"] = {
            "file": "conformance.npz",
            "images": 8,
            "max_abs_diff": 0.02,
            "decision_margin": margin,
        }
    write_manifest(
        folder,
        {
            **extra,
            "name": "tiny-test-model",
            "version": version,
            "labels": ["NORMAL", "PNEUMONIA"],
            "positive_label": "PNEUMONIA",
            "artifacts": [{"file": "model.onnx", "backend": "onnxruntime", "quantization": "none"}],
            "input": {"name": "input", "shape": ["batch", 3, 64, 64], "dtype": "float32", "layout": "NCHW"},
            "output": {"name": "probabilities", "activation": "none"},
            "preprocessing": spec.to_dict(),
            "operating_point": {"threshold": 0.5, "method": "fixed (test model)"},
            "intended_use": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"]},
        },
    )
    return sign_bundle(folder) if signed else folder


def tamper_like_the_probe(bundle: Path) -> None:
    """Issue 14's probe: flip a model byte, rewrite its hash, set the threshold to 0 (everyone positive)."""
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01
    model.write_bytes(bytes(data))
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    from edge_runtime.bundle import sha256_file

    manifest["files"]["model.onnx"] = sha256_file(model)
    manifest["operating_point"]["threshold"] = 0.0
    path.write_text(json.dumps(manifest, indent=2) + "\n")


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


def published_name(src: Path, name: str = "", config=None, key_file: Path | None = None) -> str:
    """The ``input.file_name`` a result carries for ``src`` dropped as ``name`` (never ``name`` itself).

    The reference is keyed with the box's key: the one of ``config`` (or ``key_file``),
    which the service created at start; without either, the unkeyed form.
    """
    from edge_runtime.bundle import sha256_file
    from edge_runtime.privacy import load_or_create_key, scan_ref

    path = key_file or (config.reference_key_path if config is not None else None)
    key = load_or_create_key(path) if path is not None else None
    return scan_ref(sha256_file(src), name or src.name, key=key)
