"""The pipeline container's entry point: choose the run, gate against production, sign, publish, record.

Real bundles and real manifests; moto for S3 and IoT, the Greengrass v2
Stubber for the deployment reads and the component creation. KMS: in
:func:`test_a_passing_candidate_is_signed_published_and_recorded` a botocore
Stubber backed by a real P-256 key (it checks the Sign request against the
real service model); in the end-to-end test of :func:`main`, moto's KMS with a
real ECC_NIST_P256 SIGN_VERIFY key, corrected for ``MessageType=DIGEST``
(moto 5.2 hashes the digest again; see :func:`moto_kms`). The runtime's own
verifier checks the result.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from helpers import BUCKET, NOW, REGION, make_tiny_bundle, moto_release_clients
from helpers import make_thing_group as _group
from helpers import model_component_arn as _arn
from helpers import model_recipe as _recipe

from cdk.release_steps import MODEL_COMPONENT, Clients
from edge_runtime.bundle import BundleTrust, load_bundle, write_manifest
from edge_runtime.config import ModelConfig, RuntimeConfig
from edge_runtime.errors import ModelBundleError
from edge_runtime.signing import SIGNATURE_NAME, public_key_fingerprint

moto = pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from cdk.training_image.entry import (  # noqa: E402
    DEFAULT_CONFIG,
    choose_run,
    main,
    next_version,
    release_candidate,
)

RECORDS = "healthdiag-records"
KMS_KEY = f"arn:aws:kms:{REGION}:111122223333:key/0d1c2b3a-4f5e-6d7c-8b9a-0f1e2d3c4b5a"


@pytest.fixture(name="aws")
def aws_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Clients, Stubber]]:
    """The release's clients on moto (S3, IoT, STS), Greengrass v2 stubbed (as tests/test_release.py)."""
    yield from moto_release_clients(monkeypatch, Clients)


class StubbedKms:
    """The pipeline's asymmetric KMS key (ECC_NIST_P256, SIGN_VERIFY), answered by a local private key."""

    def __init__(self, clients: Clients) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.public_pem = (
            self.private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        clients.kms = boto3.client("kms", region_name=REGION)
        self.stub = Stubber(clients.kms)
        self.stub.activate()

    def expect_signing(self, bundle_dir: Path) -> None:
        """KMS Sign on sha256(manifest.json) (DIGEST) then GetPublicKey, as real KMS answers them."""
        manifest = (bundle_dir / "manifest.json").read_bytes()
        self.stub.add_response(
            "sign",
            {
                "KeyId": KMS_KEY,
                "Signature": self.private_key.sign(manifest, ec.ECDSA(hashes.SHA256())),
                "SigningAlgorithm": "ECDSA_SHA_256",
            },
            {
                "KeyId": KMS_KEY,
                "Message": hashlib.sha256(manifest).digest(),
                "MessageType": "DIGEST",
                "SigningAlgorithm": "ECDSA_SHA_256",
            },
        )
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.stub.add_response(
            "get_public_key",
            {
                "KeyId": KMS_KEY,
                "PublicKey": der,
                "KeySpec": "ECC_NIST_P256",
                "KeyUsage": "SIGN_VERIFY",
                "SigningAlgorithms": ["ECDSA_SHA_256"],
            },
            {"KeyId": KMS_KEY},
        )


def _environment(clients: Clients) -> dict[str, str]:
    clients.s3.create_bucket(Bucket=RECORDS, CreateBucketConfiguration={"LocationConstraint": REGION})
    return {
        "HEALTHDIAG_ARTIFACT_BUCKET": BUCKET,
        "HEALTHDIAG_RECORDS_BUCKET": RECORDS,
        "HEALTHDIAG_SIGNING_KEY": KMS_KEY,
        "HEALTHDIAG_FLEET_GROUP": "fleet",
        "HEALTHDIAG_GATE": "{}",
    }


def _production(clients: Clients, stub: Stubber, manifest: dict[str, Any], version: str) -> None:
    """The fleet group runs ``version``, whose artifact zip holds ``manifest``."""
    fleet = _group(clients, "fleet", ["box-9"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.json", json.dumps({**manifest, "version": version}))
    clients.s3.put_object(
        Bucket=BUCKET, Key=f"{MODEL_COMPONENT}/{version}/pneumonia-cxr.zip", Body=buffer.getvalue()
    )
    stub.add_response(
        "list_deployments",
        {"deployments": [{"deploymentId": "dep-prod", "targetArn": fleet, "creationTimestamp": NOW}]},
        {"targetArn": fleet, "historyFilter": "LATEST_ONLY"},
    )
    stub.add_response(
        "get_deployment",
        {"deploymentId": "dep-prod", "components": {MODEL_COMPONENT: {"componentVersion": version}}},
        {"deploymentId": "dep-prod"},
    )


def _candidate(default_bundle: Path) -> dict[str, Any]:
    return dict(json.loads((default_bundle / "manifest.json").read_text(encoding="utf-8")))


def test_a_passing_candidate_is_signed_published_and_recorded(
    aws: tuple[Clients, Stubber],
    default_bundle: Path,
    tmp_path: Path,
) -> None:
    clients, stub = aws
    env = _environment(clients)
    kms = StubbedKms(clients)
    bundle = Path(shutil.copytree(default_bundle, tmp_path / "candidate"))
    (bundle / SIGNATURE_NAME).unlink()  # a fresh candidate: signed by the pipeline, not the project key
    kms.expect_signing(bundle)
    older = copy.deepcopy(_candidate(default_bundle))
    older["metrics"]["test"]["auc"] = 0.9481  # what 0.1.1 scored
    _production(clients, stub, older, "0.1.1")
    version = _candidate(default_bundle)["version"]
    stub.add_client_error(
        "get_component",
        "ResourceNotFoundException",
        http_status_code=404,
        expected_params={"arn": _arn(version), "recipeOutputFormat": "YAML"},
    )
    stub.add_response(
        "create_component_version",
        {
            "arn": _arn(version),
            "componentName": MODEL_COMPONENT,
            "componentVersion": version,
            "creationTimestamp": NOW,
            "status": {"componentState": "REQUESTED"},
        },
        {"inlineRecipe": _recipe(version).encode()},
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text('{"train": ["a.jpeg"], "val": ["b.jpeg"]}')
    (run / "evaluation.json").write_text('{"threshold": 0.93}')
    record = release_candidate(clients, bundle, env, "release-7", run_dir=run)
    assert record["passed"] and record["production"].endswith("0.1.1")
    assert record["dataset_sha256"] == hashlib.sha256((run / "split.json").read_bytes()).hexdigest()
    assert record["evaluation"] == {"threshold": 0.93}
    assert record["publish"]["status"] == "published"
    assert record["component"] == {MODEL_COMPONENT: {"ComponentVersion": version}}
    kms.stub.assert_no_pending_responses()
    digest = bytes.fromhex(record["manifest_sha256"])
    manifest = (bundle / "manifest.json").read_bytes()
    assert digest == hashlib.sha256(manifest).digest()
    public = kms.private_key.public_key()
    public.verify(base64.b64decode(record["manifest_signature"]), manifest, ec.ECDSA(hashes.SHA256()))
    assert record["signing_key_fingerprint"] == public_key_fingerprint(public)
    # A box whose configuration trusts the pipeline's key (inline PEM) accepts the bundle ...
    config = RuntimeConfig.from_mapping({"Model": {"TrustedKeys": [kms.public_pem]}})
    loaded = load_bundle(bundle, trust=BundleTrust.from_config(config.model))
    assert loaded.signature.verified and loaded.signature.signer == record["signing_key_fingerprint"]
    # ... and one that trusts only the project's bundled-models key refuses it.
    with pytest.raises(ModelBundleError, match="which is not trusted"):
        load_bundle(bundle, trust=BundleTrust.from_config(ModelConfig()))
    stored = json.loads(
        clients.s3.get_object(Bucket=RECORDS, Key="releases/release-7/verdict.json")["Body"].read()
    )
    assert stored == record
    key = f"{MODEL_COMPONENT}/{version}/pneumonia-cxr.zip"
    with zipfile.ZipFile(io.BytesIO(clients.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())) as z:
        shipped = {name: z.read(name) for name in z.namelist()}
    assert SIGNATURE_NAME in shipped, "the device would refuse a model zip without its signature"
    assert shipped[SIGNATURE_NAME] == (bundle / SIGNATURE_NAME).read_bytes()


def test_a_candidate_worse_than_production_is_recorded_and_not_published(
    aws: tuple[Clients, Stubber],
    default_bundle: Path,
) -> None:
    clients, stub = aws
    env = _environment(clients)
    better = copy.deepcopy(_candidate(default_bundle))
    better["metrics"]["test"]["auc"] = 0.995
    _production(clients, stub, better, "0.3.0")
    record = release_candidate(clients, default_bundle, env, "release-8")  # no Greengrass stub: no publish
    assert record["passed"] is False and "publish" not in record and "component" not in record
    assert [c["name"] for c in record["checks"] if not c["passed"]] == ["non-inferiority to production"]
    stored = json.loads(
        clients.s3.get_object(Bucket=RECORDS, Key="releases/release-8/verdict.json")["Body"].read()
    )
    assert stored["passed"] is False


# -- choosing the run: release, version and config from the state machine's hyperparameters ------


def _never() -> Any:
    raise AssertionError("not needed: the version was given")


@pytest.mark.parametrize(
    ("published", "production", "expected"),
    [
        ([], None, "0.1.0"),  # nothing was ever published
        (["0.1.0", "0.2.0", "0.10.0", "0.9.3"], "0.2.0", "0.10.1"),  # semver order, not text
        (["0.1.0", "0.2.0"], "0.4.0", "0.4.1"),  # above production too
        (["0.2.0", "0.3.0-rc.1"], None, "0.3.1"),
    ],
)
def test_the_version_defaults_to_the_next_patch_above_published_and_production(
    published: list[str], production: str | None, expected: str
) -> None:
    assert next_version(published, production) == expected
    hyper = {"release": "release-0.3.0", "input": "{}"}  # what the state machine passes for input {}
    choice = choose_run(hyper, lambda: published, lambda: production)
    assert (choice.release, choice.version, choice.config) == ("release-0.3.0", expected, DEFAULT_CONFIG)


def test_version_and_config_come_from_hyperparameters_then_the_execution_input() -> None:
    execution_input = json.dumps({"version": "0.3.0", "config": "training/configs/x.toml", "other": 1})
    from_input = choose_run({"release": "r.1", "input": execution_input}, lambda: ["0.2.0"], _never)
    assert (from_input.version, from_input.config) == ("0.3.0", "training/configs/x.toml")
    overridden = choose_run(
        {"release": "r.1", "input": execution_input, "version": "0.4.0", "config": "training/configs/y.toml"},
        lambda: ["0.2.0"],
        _never,
    )
    assert (overridden.version, overridden.config) == ("0.4.0", "training/configs/y.toml")
    only_config = choose_run(
        {"release": "r.1", "input": '{"config": "training/configs/x.toml"}'}, lambda: ["0.2.0"], lambda: None
    )
    assert (only_config.version, only_config.config) == ("0.2.1", "training/configs/x.toml")


@pytest.mark.parametrize(
    ("hyper", "message"),
    [
        ({"input": "{}"}, "'release'"),
        ({"release": "r", "input": "not json"}, "not JSON"),
        ({"release": "r", "input": '["0.3.0"]'}, "not a JSON object"),
        ({"release": "r", "input": '{"version": "0.3"}'}, "not a semantic version"),
        ({"release": "r", "input": '{"version": "0.2.0"}'}, "already published"),
    ],
)
def test_a_run_that_cannot_be_released_is_refused_before_training(
    hyper: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        choose_run(hyper, lambda: ["0.1.0", "0.2.0"], lambda: "0.2.0")


# -- main() end to end: hyperparameters -> (prepared) training -> gate -> KMS sign -> publish -> verdict


@pytest.fixture(name="moto_kms")
def moto_kms_honouring_digest(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's KMS, with Sign corrected for ``MessageType=DIGEST``.

    moto 5.2 ignores MessageType and hashes the message again, so the
    signature covers sha256(sha256(manifest)); real KMS signs a DIGEST message
    as the digest it is. Only that is patched (ECDSA with ``Prehashed``): the
    key, its public half, the request handling and the rest of KMS are moto's.
    """
    from moto.kms import responses, utils

    digest_requests: list[bool] = []
    respond = responses.KmsResponse.sign
    sign = utils.ECDSAPrivateKey.sign

    def respond_noting_the_type(self: Any) -> str:
        digest_requests.append(self._get_param("MessageType") == "DIGEST")
        try:
            return str(respond(self))
        finally:
            digest_requests.pop()

    def sign_digest_as_given(self: Any, message: bytes, signing_algorithm: str) -> bytes:
        if digest_requests and digest_requests[-1]:
            assert signing_algorithm == "ECDSA_SHA_256" and len(message) == 32
            return bytes(self.private_key.sign(message, ec.ECDSA(Prehashed(hashes.SHA256()))))
        return bytes(sign(self, message, signing_algorithm))

    monkeypatch.setattr(responses.KmsResponse, "sign", respond_noting_the_type)
    monkeypatch.setattr(utils.ECDSAPrivateKey, "sign", sign_digest_as_given)
    yield


def _stub_fleet_runs(stub: Stubber, fleet: str, version: str) -> None:
    stub.add_response(
        "list_deployments",
        {"deployments": [{"deploymentId": "dep-prod", "targetArn": fleet, "creationTimestamp": NOW}]},
        {"targetArn": fleet, "historyFilter": "LATEST_ONLY"},
    )
    stub.add_response(
        "get_deployment",
        {"deploymentId": "dep-prod", "components": {MODEL_COMPONENT: {"componentVersion": version}}},
        {"deploymentId": "dep-prod"},
    )


def _prepared_training(default_bundle: Path, calls: list[list[str]]) -> Callable[[Sequence[str]], None]:
    """Stands in for ``python -m training pipeline`` (hours): writes a tiny candidate where it was asked.

    The candidate is a real (tiny) ONNX bundle of the requested version with a
    conformance set, carrying the bundled model's measured metrics so the gate
    has numbers to judge; unsigned, as training leaves it.
    """

    def train(command: Sequence[str]) -> None:
        calls.append(list(command))
        option = dict(zip(command[4::2], command[5::2], strict=True))
        bundle = make_tiny_bundle(
            Path(option["--bundle"]), version=option["--version"], conformance=True, signed=False
        )
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        measured = _candidate(default_bundle)
        manifest.update(metrics=measured["metrics"], calibration=measured["calibration"])
        write_manifest(bundle, manifest)
        run = Path(option["--out"])
        run.mkdir(parents=True, exist_ok=True)
        (run / "split.json").write_text('{"train": ["a.jpeg"], "val": ["b.jpeg"]}')

    return train


def test_main_trains_the_next_version_and_releases_it_end_to_end(
    aws: tuple[Clients, Stubber], moto_kms: None, default_bundle: Path, tmp_path: Path
) -> None:
    """main() as SageMaker runs it, with a temporary /opt/ml and the training step replaced by a
    prepared candidate: input ``{}`` -> version 0.3.1 (above published 0.3.0, which the fleet runs)
    -> gate against production -> moto KMS signature -> publish -> releases/<release>/verdict.json.
    """
    clients, stub = aws
    env = _environment(clients)
    clients.kms = boto3.client("kms", region_name=REGION)
    key = clients.kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    release = "nightly-2026.12.07"  # an execution name with dots: not a valid training job name
    env |= {"HEALTHDIAG_SIGNING_KEY": key, "TRAINING_JOB_NAME": "nightly-2026-12-07-4f2a"}
    ml = tmp_path / "ml"
    (ml / "input/config").mkdir(parents=True)
    (ml / "input/config/hyperparameters.json").write_text(json.dumps({"release": release, "input": "{}"}))

    # The version: published versions (two pages) and what the fleet runs.
    fleet = _group(clients, "fleet", ["box-9"])
    stub.add_response(
        "list_component_versions",
        {
            "componentVersions": [
                {"componentName": MODEL_COMPONENT, "componentVersion": v, "arn": _arn(v)}
                for v in ("0.3.0", "0.1.0")
            ],
            "nextToken": "page-2",
        },
        {"arn": _arn()},
    )
    stub.add_response(
        "list_component_versions",
        {"componentVersions": [{"componentName": MODEL_COMPONENT, "componentVersion": "0.2.5"}]},
        {"arn": _arn(), "nextToken": "page-2"},
    )
    _stub_fleet_runs(stub, fleet, "0.3.0")
    # The gate's production: the fleet's version and its artifact's manifest.
    _stub_fleet_runs(stub, fleet, "0.3.0")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.json", json.dumps({**_candidate(default_bundle), "version": "0.3.0"}))
    clients.s3.put_object(
        Bucket=BUCKET, Key=f"{MODEL_COMPONENT}/0.3.0/pneumonia-cxr.zip", Body=buffer.getvalue()
    )
    # Publishing 0.3.1.
    stub.add_client_error(
        "get_component",
        "ResourceNotFoundException",
        http_status_code=404,
        expected_params={"arn": _arn("0.3.1"), "recipeOutputFormat": "YAML"},
    )
    stub.add_response(
        "create_component_version",
        {
            "arn": _arn("0.3.1"),
            "componentName": MODEL_COMPONENT,
            "componentVersion": "0.3.1",
            "creationTimestamp": NOW,
            "status": {"componentState": "REQUESTED"},
        },
        {"inlineRecipe": _recipe("0.3.1").encode()},
    )

    calls: list[list[str]] = []
    assert main(ml, environ=env, clients=clients, train=_prepared_training(default_bundle, calls)) == 0

    assert calls == [
        [
            sys.executable,
            "-m",
            "training",
            "pipeline",
            "--config",
            DEFAULT_CONFIG,
            "--data",
            str(ml / "input/data/data/kermany_pneumonia_224"),
            "--out",
            str(ml / "model/run"),
            "--bundle",
            str(ml / "model/bundle"),
            "--version",
            "0.3.1",
        ]
    ]
    stored = json.loads(
        clients.s3.get_object(Bucket=RECORDS, Key=f"releases/{release}/verdict.json")["Body"].read()
    )
    assert stored["passed"], [c for c in stored["checks"] if not c["passed"]]
    assert (stored["release"], stored["training_job"], stored["version"]) == (
        release,
        "nightly-2026-12-07-4f2a",
        "0.3.1",
    )
    assert stored["config"] == DEFAULT_CONFIG and stored["production"].endswith("0.3.0")
    assert stored["publish"]["status"] == "published"
    assert stored["component"] == {MODEL_COMPONENT: {"ComponentVersion": "0.3.1"}}
    split = (ml / "model/run/split.json").read_bytes()
    assert stored["dataset_sha256"] == hashlib.sha256(split).hexdigest()
    assert not (ml / "output/failure").exists()

    # What a box downloads: the zip holds the KMS signature, which the runtime accepts with the
    # key's public half (from KMS) as its only trusted key.
    zipped = clients.s3.get_object(Bucket=BUCKET, Key=f"{MODEL_COMPONENT}/0.3.1/pneumonia-cxr.zip")
    unpacked = tmp_path / "device"
    with zipfile.ZipFile(io.BytesIO(zipped["Body"].read())) as archive:
        archive.extractall(unpacked)
    public = serialization.load_der_public_key(clients.kms.get_public_key(KeyId=key)["PublicKey"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    manifest = (unpacked / "manifest.json").read_bytes()
    public.verify(base64.b64decode(stored["manifest_signature"]), manifest, ec.ECDSA(hashes.SHA256()))
    loaded = load_bundle(unpacked, trust=BundleTrust.from_public_keys([public]))
    assert loaded.signature.verified and loaded.signature.signer == stored["signing_key_fingerprint"]
    assert loaded.manifest.version == "0.3.1"


def test_main_records_why_it_failed_for_sagemaker(aws: tuple[Clients, Stubber], tmp_path: Path) -> None:
    """No 'release' hyperparameter: refused before training, the reason in output/failure."""
    clients, _ = aws
    env = _environment(clients)
    ml = tmp_path / "ml"
    (ml / "input/config").mkdir(parents=True)
    (ml / "input/config/hyperparameters.json").write_text('{"input": "{}"}')

    def train(command: Sequence[str]) -> None:
        raise AssertionError("trained without a release name")

    with pytest.raises(ValueError, match="'release'"):
        # The root as the image is told it (no ml_root argument).
        main(environ={**env, "HEALTHDIAG_ML_ROOT": str(ml)}, clients=clients, train=train)
    assert "hyperparameter 'release'" in (ml / "output/failure").read_text(encoding="utf-8")


def test_the_weights_channel_replaces_the_configs_weights_path(tmp_path: Path) -> None:
    """The configs name weights by a checkout path the image lacks; SageMaker brings them as a channel."""
    from cdk.training_image.entry import weights_argument

    assert weights_argument(tmp_path) == []  # no channel: the config's own (or random) weights
    channel = tmp_path / "input/data/weights"
    channel.mkdir(parents=True)
    (channel / "efficientnet-lite0-57934424.pth").write_bytes(b"\0")
    assert weights_argument(tmp_path) == ["--weights", str(channel / "efficientnet-lite0-57934424.pth")]
    (channel / "other.pth").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"holds 2 \.pth files"):
        weights_argument(tmp_path)
