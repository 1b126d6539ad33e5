"""What the tests share: helper functions, classes and constants (no fixtures; those are in conftest.py).

Test modules import these as ``from helpers import ...``, never from ``conftest`` or from another test
module (tests/test_tests_stand_alone.py checks it), so each test file stands alone. ``tests/`` is on
``sys.path`` the way it is for conftest.py: tests/ has no ``__init__.py`` and pytest's default
``prepend`` import mode puts it first on the path when it loads the rootdir's conftest.

Imported by conftest.py at the start of the session, so it imports only what conftest always did
(numpy, paho-mqtt, pytest, the signing module); everything else (pydicom, cv2, boto3, moto, the
configuration, packaging) is imported inside the helper that needs it.
"""

from __future__ import annotations

import ast
import atexit
import datetime as dt
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_runtime.signing import bundled_models_key_path, generate_signing_key

if TYPE_CHECKING:
    import pydicom

    from edge_runtime.config import RuntimeConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
#: ``../shared/data``: real X-rays and DICOM, beside the repo (the ``shared_data`` fixture skips without it).
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# -- bundle signing ------------------------------------------------------------------------
# One P-256 key for the whole session (generated here, never committed) signs every tiny
# bundle, as `training package --signing-key` would. conftest.py makes the session's configured
# trust the bundled models' key plus this one, set the way a site sets it
# (EDGE_RUNTIME__MODEL__TRUSTED_KEYS), so load_bundle() and the service subprocesses believe tiny
# bundles while unsigned and tampered ones are still refused. Tests about signing pass their own
# BundleTrust.
_KEY_DIR = Path(tempfile.mkdtemp(prefix="healthdiag-test-keys-"))
atexit.register(shutil.rmtree, _KEY_DIR, ignore_errors=True)
TEST_SIGNING_KEY, TEST_PUBLIC_KEY, TEST_KEY_FINGERPRINT = generate_signing_key(_KEY_DIR, "test-signing")
#: Model.TrustedKeys for tests that build their configuration as a mapping (no environment).
TEST_TRUSTED_KEYS = [str(bundled_models_key_path()), str(TEST_PUBLIC_KEY)]


def sign_bundle(folder: Path, key: Path = TEST_SIGNING_KEY) -> Path:
    """Sign ``folder``'s manifest as it is now (after a test rewrote it on purpose)."""
    from edge_runtime.signing import load_private_key, sign_manifest

    sign_manifest(folder, load_private_key(key))
    return folder


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` has the DICM preamble of a DICOM file."""
    with path.open("rb") as fh:
        return fh.read(132)[128:] == b"DICM"


# -- real processes on loopback ports ------------------------------------------------------


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


class StoreScp:
    """dcmtk's storescp: the PACS node."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "PACS", "-od", str(self.folder), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stored(self) -> list[pydicom.Dataset]:
        import pydicom

        return [pydicom.dcmread(p) for p in sorted(self.folder.rglob("*")) if p.is_file()]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
            self.proc = None


# -- model bundles -------------------------------------------------------------------------


def make_tiny_bundle(
    folder: Path,
    *,
    version: str = "0.0.1",
    conformance: bool = False,
    drift: float = 0.0,
    margin: float = 0.02,
    signed: bool = True,
    ood: bool = False,
) -> Path:
    """A real (tiny) ONNX classifier bundle: mean intensity -> 2-class softmax.

    Bright images score PNEUMONIA. Small enough to build in milliseconds, so
    tests that are about plumbing do not depend on the bundled model. With
    ``conformance`` it carries a reference set of 8 grey levels whose
    references ONNX Runtime computes here; ``drift`` is taken off the last
    (brightest) reference, as if this CPU computed that much differently
    from the build machine. ``signed``: signed with the session's test key
    (trusted by the session's configuration), else no ``manifest.sig.json``.
    ``ood``: the model also outputs ``features`` (the pooled input, 3 values, as the layer
    ``input``) and the bundle has an out-of-distribution check fitted on grey levels
    0.3-0.7 (``ood.npz``, threshold 1.5: grey levels below ~0.15 or above ~0.85 are outside); with
    ``conformance`` the set holds the features measured here (``features_expected_onnxruntime``).
    """
    import onnx
    from onnx import TensorProto, helper

    from edge_runtime.bundle import write_manifest
    from edge_runtime.preprocess import PreprocessSpec

    spec = PreprocessSpec(height=64, width=64)
    folder.mkdir(parents=True, exist_ok=True)
    w = np.array([[-4.0, 4.0], [0, 0], [0, 0]], dtype=np.float32)
    b = np.array([0.0, 0.0], dtype=np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])]
    if ood:
        nodes.insert(2, helper.make_node("Identity", ["flat"], ["features"]))
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        outputs,
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
        if ood:
            features = session.run(["features"], {"input": x})[0].astype(np.float32)
            with np.load(folder / "conformance.npz") as saved:
                arrays = {key: saved[key] for key in saved.files}
            np.savez_compressed(folder / "conformance.npz", **arrays, features_expected_onnxruntime=features)
            extra["conformance"].update({"ood_max_drift": 0.05, "ood_decision_margin": 0.05})
    artifact: dict = {"file": "model.onnx", "backend": "onnxruntime", "quantization": "none"}
    output: dict = {"name": "probabilities", "activation": "none"}
    intended_use: dict = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"]}
    if ood:
        from edge_runtime.ood import OodModel
        from edge_runtime.ood import save as save_ood

        # Grey levels 0.3-0.7 with a little per-channel noise: the "training split" of the check.
        rng = np.random.default_rng(0)
        levels = rng.uniform(0.3, 0.7, 200)
        train = (levels[:, None] - 0.5) / 0.5 + rng.normal(0.0, 0.01, (200, 3))
        save_ood(OodModel.fit([(train.mean(axis=0), np.cov(train, rowvar=False))], train), folder / "ood.npz")
        artifact["features"] = True
        output["features"] = {"name": "features", "layers": ["input"], "dims": [3]}
        intended_use["ood"] = {"method": "stage-mahalanobis", "file": "ood.npz", "threshold": 1.5}
    write_manifest(
        folder,
        {
            **extra,
            "name": "tiny-test-model",
            "version": version,
            "labels": ["NORMAL", "PNEUMONIA"],
            "positive_label": "PNEUMONIA",
            "artifacts": [artifact],
            "input": {"name": "input", "shape": ["batch", 3, 64, 64], "dtype": "float32", "layout": "NCHW"},
            "output": output,
            "preprocessing": spec.to_dict(),
            "operating_point": {"threshold": 0.5, "method": "fixed (test model)"},
            "intended_use": intended_use,
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


# -- scans and service configurations -------------------------------------------------------

#: Paths under SHARED_DATA. A chest CR (PA) the bundled model's intended use admits.
SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
#: The same chest CR, as a modality sends it uncompressed (Explicit VR LE, 1 MB).
CHEST_UNCOMPRESSED = "dicom/derived/siim_cxr_explicit_le.dcm"
KERMANY = "cxr/kermany_pneumonia_224/test"
NORMAL_JPEG = f"{KERMANY}/NORMAL/IM-0001-0001.jpeg"
PNEUMONIA_JPEG = f"{KERMANY}/PNEUMONIA/person1_virus_6.jpeg"

#: The DICOM receiver's AE title and the modalities allowed to call it (scp_service_config).
AE = "HEALTHDIAG"
SENDERS = ("MODALITY1", "MODALITY2", "MODALITY3")
MAX_OBJECT_MB = 5  # RG1_UNCR (7.2 MB) is over it; every other file the receiver tests send is under


def _service_mapping(root: Path, broker, bundle: Path, workers: int, **inbox) -> dict[str, Any]:
    """What every test service shares: folders under ``root``, the signed ``bundle``, MQTT on ``broker``."""
    return {
        "Inbox": {
            "Path": str(root / "inbox"),
            "QuarantinePath": str(root / "quarantine"),
            "RescanIntervalSeconds": 0.5,
            **inbox,
        },
        "Model": {"BundlePath": str(bundle), "TrustedKeys": TEST_TRUSTED_KEYS},
        "Mqtt": {
            "Host": broker.host,
            "Port": broker.port,
            "ClientId": f"edge-{root.name}",
            "TopicPrefix": f"test/{root.name}",
        },
        "Journal": {"Path": str(root / "state" / "journal.sqlite3")},
        # Any free port: services of several tests (and one a developer runs) never collide.
        "Admin": {"Port": 0},
        "Workers": workers,
    }


def service_config(
    tmp_path: Path, broker, bundle: Path, decode: dict | None = None, **inbox
) -> RuntimeConfig:
    """The inbox service with MQTT on ``broker`` and ``bundle`` (what test_service_e2e.py runs)."""
    from edge_runtime.config import RuntimeConfig

    mapping = _service_mapping(tmp_path, broker, bundle, 2, **{"SettleSeconds": 0.3, **inbox})
    return RuntimeConfig.from_mapping({**mapping, "Decode": decode or {}})


def drop(src: Path, inbox: Path, name: str | None = None) -> Path:
    """Copy the way a careful sender does: write NAME.part, then rename."""
    inbox.mkdir(parents=True, exist_ok=True)
    target = inbox / (name or src.name)
    part = target.with_name(target.name + ".part")
    shutil.copyfile(src, part)
    part.rename(target)
    return target


def scp_service_config(root: Path, broker, bundle: Path, port: int, **dicom) -> RuntimeConfig:
    """The service with its DICOM receiver on ``port`` (AE, SENDERS, MAX_OBJECT_MB) and MQTT on ``broker``."""
    from edge_runtime.config import RuntimeConfig

    dicom_section = {
        "Enabled": True,
        "AeTitle": AE,
        "BindAddress": "127.0.0.1",
        "Port": port,
        "AllowedCallingAeTitles": list(SENDERS),
        "MaxObjectMb": MAX_OBJECT_MB,
        "SpoolPath": str(root / "spool"),
        **dicom,
    }
    return RuntimeConfig.from_mapping({**_service_mapping(root, broker, bundle, 2), "Dicom": dicom_section})


def reports_service_config(tmp_path: Path, broker, bundle: Path, **sections) -> RuntimeConfig:
    """The inbox service writing reports, one worker; ``sections`` add to (or replace) its settings."""
    from edge_runtime.config import RuntimeConfig

    data = _service_mapping(tmp_path, broker, bundle, 1, SettleSeconds=0.2)
    data["Reports"] = {"Path": str(tmp_path / "reports")}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return RuntimeConfig.from_mapping(data)


def storescu(
    port: int, *files: Path, aet: str = SENDERS[0], options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` to the receiver on ``port`` with dcmtk's storescu, calling as ``aet``."""
    return subprocess.run(
        [dcmtk("storescu"), "-aet", aet, "-aec", AE, *options, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def spool_files(config: RuntimeConfig) -> list[Path]:
    """What the DICOM receiver holds in its spool folder."""
    return sorted(config.dicom.spool_path.iterdir()) if config.dicom.spool_path.is_dir() else []


def chest_dicom_from_jpeg(src: Path, dst: Path) -> Path:
    """A paediatric chest radiograph (Kermany JPEG) as the CR a modality would send, with a patient."""
    import cv2
    import pydicom

    pixels = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "DOE^JOHN",
        "MRN123456",
        "20190101",
        "M",
    )
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261130", "080000", "A1", "1"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "AP"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(dst, enforce_file_format=True)
    return dst


# -- the release command against moto (tests/test_release*.py) -------------------------------

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's account
BUCKET = "healthdiag-artifacts"
NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def moto_release_clients(monkeypatch: pytest.MonkeyPatch, clients_type: Any) -> Iterator[tuple[Any, Any]]:
    """The body of an ``aws`` fixture: ``clients_type`` (the release's Clients) on moto, Greengrass stubbed.

    Yields ``(clients, stubber)`` with the artifact bucket created; at the end every stubbed
    Greengrass response must have been used.
    """
    import boto3
    import moto
    from botocore.stub import Stubber

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    with moto.mock_aws():
        greengrass = boto3.client("greengrassv2", region_name=REGION)
        clients = clients_type(
            s3=boto3.client("s3", region_name=REGION),
            iot=boto3.client("iot", region_name=REGION),
            greengrass=greengrass,
            sts=boto3.client("sts", region_name=REGION),
            region=REGION,
        )
        clients.s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        with Stubber(greengrass) as stub:
            yield clients, stub
            stub.assert_no_pending_responses()


def model_component_arn(version: str | None = None) -> str:
    """The model component's ARN in moto's account, of one version or of the component."""
    from components.names import MODEL_COMPONENT

    arn = f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:{MODEL_COMPONENT}"
    return f"{arn}:versions:{version}" if version else arn


def model_recipe(version: str) -> str:
    """The model component's recipe for ``version``, as the build renders it for BUCKET."""
    from components import build
    from components.names import MODEL_COMPONENT

    return str(build.render_recipe(MODEL_COMPONENT, version, BUCKET))


def make_thing_group(clients: Any, name: str, things: list[str]) -> str:
    """A thing group ``name`` holding new things ``things`` (in moto's IoT); returns its ARN."""
    arn = clients.iot.create_thing_group(thingGroupName=name)["thingGroupArn"]
    for thing in things:
        clients.iot.create_thing(thingName=thing)
        clients.iot.add_thing_to_thing_group(thingGroupName=name, thingName=thing)
    return str(arn)


# -- what the build and release commands import (tests/test_build_commands.py, test_training_image.py)

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
#: Packages of this checkout that the commands import: followed, not looked up on PyPI.
LOCAL_PACKAGES = frozenset({"components", "cdk"})
#: The project's own installed package: its imports are the base dependencies' business.
PROJECT_PACKAGE = "edge_runtime"


def _module_file(dotted: str) -> Path | None:
    """The checkout's file for a module of a local package, or None."""
    base = REPO_ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}


def _imported_modules(path: Path) -> Iterator[str]:
    """Dotted names a module imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    relative = path.relative_to(REPO_ROOT).with_suffix("")
    package = list(relative.parts[:-1] if relative.name != "__init__" else relative.parent.parts)
    todo: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"), filename=str(path))]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package[: len(package) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # maybe submodules
        todo.extend(ast.iter_child_nodes(node))


def third_party_imports(
    entry_points: Iterable[str], local_packages: Iterable[str] = LOCAL_PACKAGES
) -> dict[str, str]:
    """Top-level third-party module -> the first checkout file importing it, following local imports.

    ``local_packages``: the checkout's packages whose imports are followed (not looked up on PyPI).
    """
    local = set(local_packages)
    found: dict[str, str] = {}
    seen: set[Path] = set()
    todo = [REPO_ROOT / p for p in entry_points]
    for entry in list(todo):  # the packages' __init__ run first
        for parent in entry.relative_to(REPO_ROOT).parents:
            if parent.parts and (REPO_ROOT / parent / "__init__.py").is_file():
                todo.append(REPO_ROOT / parent / "__init__.py")
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for dotted in _imported_modules(path):
            top = dotted.split(".")[0]
            if top in local:
                parts = dotted.split(".")
                for depth in range(1, len(parts) + 1):  # each package on the way is imported too
                    module = _module_file(".".join(parts[:depth]))
                    if module is not None:
                        todo.append(module)
            elif top and top != PROJECT_PACKAGE and top not in sys.stdlib_module_names:
                found.setdefault(top, str(path.relative_to(REPO_ROOT)))
    return found


def project_requirements(extras: Iterable[str]) -> list[str]:
    """pyproject's requirements of the project with ``extras``."""
    project = PYPROJECT["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return requirements


def installable(extras: Iterable[str]) -> set[str]:
    """Canonical names of every distribution ``pip install '.[extras]'`` brings in.

    The project's requirements come from pyproject.toml (self-references such as
    ``healthdiag-edge[build]`` included); those of other distributions from their installed metadata.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = canonicalize_name(PYPROJECT["project"]["name"])
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(text) for text in project_requirements(extras)]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        if name == project:
            todo += [Requirement(text) for text in project_requirements(requirement.extras)]
            continue
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here; the import check of the test says so if it matters
        for text in requires:
            sub = Requirement(text)
            active = requirement.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in active):
                todo.append(sub)
    return {name for name, _ in seen}


#: A model as results name it (the hashes are placeholders: nothing is loaded).
RESULT_MODEL = {
    "name": "pneumonia-cxr",
    "version": "0.3.0",
    "sha256": "a" * 64,
    "backend": "onnxruntime",
    "quantization": "int8",
    "preprocessing_sha256": "b" * 64,
}


def make_analysis(
    probabilities: Any,
    *,
    kind: str = "dicom",
    metadata: dict[str, Any] | None = None,
    threshold: float = 0.5,
    intended_use: Any = None,
) -> Any:
    """``results.analysis_of`` for a binary NORMAL/PNEUMONIA model, as the box builds it, no model run.

    ``intended_use``: an ``IntendedUseVerdict`` (None: nothing checked beyond the header).
    """
    from edge_runtime.results import analysis_of

    return analysis_of(
        file_name="scan-0123456789abcdef." + ("dcm" if kind == "dicom" else "png"),
        sha256="c" * 64,
        kind=kind,
        decoder="dicom" if kind == "dicom" else "raster",
        metadata=metadata or {},
        model=RESULT_MODEL,
        labels=["NORMAL", "PNEUMONIA"],
        probabilities=probabilities,
        positive_label="PNEUMONIA",
        threshold=threshold,
        timings_ms={"decode": 1.0, "preprocess": 2.0, "infer": 3.0},
        intended_use=intended_use,
    )


# -- the Keras training route (.venv-keras) ---------------------------------------------------

KERAS_PYTHON = REPO_ROOT / ".venv-keras" / "bin" / "python"
IMAGENET_LITE0 = SHARED_DATA / "weights" / "efficientnet-lite0-57934424.pth"
KERMANY_ROOT = SHARED_DATA / "cxr" / "kermany_pneumonia_224"
#: Set by .ci/run once it built .venv-keras: the Keras tests then fail instead of skipping.
REQUIRE_KERAS = "EDGE_RUNTIME_TESTS_REQUIRE_KERAS"
#: The tiny run both test_keras_training.py and test_keras_export.py look at: 12 images per class, a
#: third to validation (16 training and 8 validation images, patient-disjoint), at 64 px.
TINY_KERAS_SIZE, TINY_KERAS_LIMIT, TINY_KERAS_VAL_FRACTION, TINY_KERAS_SEED = 64, 12, 0.34, 2018


def need_keras_route(*data: Path) -> None:
    """Skip (or fail under EDGE_RUNTIME_TESTS_REQUIRE_KERAS=1) without .venv-keras or the shared files."""
    missing = None
    if not KERAS_PYTHON.is_file():
        venv = KERAS_PYTHON.parent.parent
        missing = f"no Keras environment at {venv} (create it with: training/keras_env.sh setup)"
    for needed in data or (IMAGENET_LITE0, KERMANY_ROOT):
        if missing is None and not needed.exists():
            missing = (
                f"{needed} is missing (the shared data folder, ../shared/data, is not beside the checkout)"
            )
    if missing is not None:
        if os.environ.get(REQUIRE_KERAS) == "1":
            pytest.fail(f"{missing} ({REQUIRE_KERAS}=1)")
        pytest.skip(missing)


def training_cli(*argv: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    """``python -m training ARGV`` from the repository root, as a user runs it."""
    command = [sys.executable, "-m", "training", *argv]
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def train_tiny_keras(folder: Path) -> subprocess.CompletedProcess[str]:
    """The tiny Keras run through the real command: 1 head epoch, 2 stage-2 epochs of 2 steps."""
    return training_cli(
        *("train", "--framework", "keras", "--data", str(KERMANY_ROOT), "--out", str(folder)),
        *("--size", str(TINY_KERAS_SIZE), "--limit-per-class", str(TINY_KERAS_LIMIT)),
        *("--val-fraction", str(TINY_KERAS_VAL_FRACTION), "--seed", str(TINY_KERAS_SEED)),
        *("--weights", str(IMAGENET_LITE0), "--aug-views", "1", "--head-epochs", "1"),
        *("--epochs", "2", "--max-steps", "2", "--batch-size", "8"),
    )
