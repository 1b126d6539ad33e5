"""Entry point of the release pipeline's SageMaker training job (``train`` in the image).

1. ``python -m training pipeline`` on the ``data`` channel, writing the run and
   the candidate bundle under ``/opt/ml/model`` (SageMaker uploads it to
   ``candidates/`` in the artifact bucket);
2. :func:`release_candidate`: the gate against the model the fleet group runs
   now, and, only if it passed, the manifest signature (KMS, written into the
   bundle as ``manifest.sig.json`` and checked with the runtime's own
   verifier) and ``cdk.release_steps.publish``; the verdict goes to
   ``releases/<release>/verdict.json`` in the records bucket, where the state
   machine reads it.

Environment (set by the pipeline stack): ``HEALTHDIAG_ARTIFACT_BUCKET``,
``HEALTHDIAG_RECORDS_BUCKET``, ``HEALTHDIAG_SIGNING_KEY``, ``HEALTHDIAG_GATE``
(the stack's gate thresholds as JSON), ``HEALTHDIAG_FLEET_GROUP``;
``TRAINING_JOB_NAME`` comes from SageMaker; ``HEALTHDIAG_ML_ROOT`` replaces
``/opt/ml`` (tests). Hyperparameters (strings, set by the state machine):
``release`` (the Step Functions execution name, which may contain dots, unlike
the training job's name: the verdict's key) and ``input`` (the execution input
as JSON, e.g. ``{}`` or ``{"version": "0.3.0", "config": "training/configs/x.toml"}``).
``version`` and ``config`` come from a hyperparameter of that name, else from
``input``; without either the version is the next patch version above every
published one and production's (0.1.0 for the first), the config
:data:`DEFAULT_CONFIG` (see :func:`choose_run`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from components.names import MODEL_ARTIFACT
from edge_runtime.bundle import MANIFEST_NAME, load_bundle
from edge_runtime.signing import BundleTrust, public_key_fingerprint, write_signature

from ..config import load_config
from ..gate import evaluate_gate
from ..release_steps import MODEL_COMPONENT, Clients, _version_key, deployed_versions, list_versions, publish

__all__ = ["DEFAULT_CONFIG", "RunChoice", "choose_run", "main", "release_candidate", "sign_bundle_with_kms"]

#: SageMaker's folder inside the container (``HEALTHDIAG_ML_ROOT`` overrides it).
ML = Path("/opt/ml")
#: The training TOML when neither a hyperparameter nor the execution input names one.
DEFAULT_CONFIG = "training/configs/kermany-efficientnet-lite0-96.toml"
#: The first version of the model component, when none was ever published.
FIRST_VERSION = "0.1.0"


@dataclass(frozen=True)
class RunChoice:
    """What the training job trains and releases, from its hyperparameters and the published versions."""

    release: str
    version: str
    config: str


def next_version(published: Sequence[str], production: str | None) -> str:
    """The next patch version above every published version and production's (0.1.0 for the first)."""
    known = [*published, *([production] if production else [])]
    if not known:
        return FIRST_VERSION
    major, minor, patch = max(_version_key(v) for v in known)[:3]
    return f"{major}.{minor}.{patch + 1}"


def _valid_version(text: str) -> str:
    if not re.fullmatch(
        r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?", text
    ):
        raise ValueError(
            f"version {text!r} is not a semantic version (MAJOR.MINOR.PATCH), as Greengrass requires"
        )
    return text


def choose_run(
    hyperparameters: Mapping[str, Any],
    published: Callable[[], Sequence[str]],
    production: Callable[[], str | None],
) -> RunChoice:
    """The release name, version and training config of this job.

    ``version`` and ``config``: the hyperparameter of that name, else the key
    of the execution input (hyperparameter ``input``, JSON), else the next
    patch version above ``published()`` and ``production()`` and
    :data:`DEFAULT_CONFIG`. ``published``/``production`` are called only when
    needed. A version given explicitly that is already published is refused
    now, not after hours of training (component versions are immutable).

    Raises:
        ValueError: no ``release``, an ``input`` that is not a JSON object, a
            version that is not semantic or already published.
    """
    release = str(hyperparameters.get("release") or "")
    if not release:
        raise ValueError(
            "hyperparameter 'release' (the Step Functions execution name) is missing: the verdict "
            "could not be written where the state machine reads it"
        )
    raw_input = hyperparameters.get("input") or "{}"
    try:
        execution_input = json.loads(raw_input) if isinstance(raw_input, str) else raw_input
    except json.JSONDecodeError as exc:
        raise ValueError(f"hyperparameter 'input' is not JSON: {exc}") from None
    if not isinstance(execution_input, Mapping):
        raise ValueError(f"hyperparameter 'input' is not a JSON object: {raw_input!r}")

    def given(name: str) -> str | None:
        for source in (hyperparameters, execution_input):
            value = source.get(name)
            if value not in (None, ""):
                return str(value)
        return None

    config = given("config") or DEFAULT_CONFIG
    version = given("version")
    if version is None:
        return RunChoice(release, next_version(published(), production()), config)
    version = _valid_version(version)
    if version in published():
        raise ValueError(
            f"{MODEL_COMPONENT} {version} is already published (component versions are immutable): "
            "start the release with another version, or none to take the next one"
        )
    return RunChoice(release, version, config)


def production_manifest(clients: Clients, bucket: str, fleet_group: str) -> dict[str, Any] | None:
    """The manifest of the model version the fleet group's deployment pins (None: nothing deployed)."""
    version = deployed_versions(clients, [fleet_group])[fleet_group]
    if version is None:
        return None
    body = clients.s3.get_object(Bucket=bucket, Key=f"{MODEL_COMPONENT}/{version}/{MODEL_ARTIFACT}")["Body"]
    with zipfile.ZipFile(io.BytesIO(body.read())) as archive:
        return dict(json.loads(archive.read("manifest.json")))


def _provenance(run_dir: Path | None) -> dict[str, Any]:
    """What the record keeps of the run: the data split's hash and the evaluation report."""
    if run_dir is None:
        return {}
    out: dict[str, Any] = {}
    split = run_dir / "split.json"
    if split.is_file():  # every item id of train/validation/test: the dataset as trained on
        out["dataset_sha256"] = hashlib.sha256(split.read_bytes()).hexdigest()
    evaluation = run_dir / "evaluation.json"
    if evaluation.is_file():
        out["evaluation"] = json.loads(evaluation.read_text(encoding="utf-8"))
    return out


def sign_bundle_with_kms(kms: Any, key_id: str, bundle_dir: Path) -> tuple[str, str, BundleTrust]:
    """Sign ``manifest.json`` with the KMS key, write ``manifest.sig.json``, verify it as a box would.

    KMS signs the sha256 of the manifest (``MessageType=DIGEST``): ECDSA P-256
    over the manifest's bytes, which is what the runtime checks. Returns the
    base64 signature, the key fingerprint and a trust of that key alone (for
    publishing).
    """
    manifest = (bundle_dir / MANIFEST_NAME).read_bytes()
    signature = kms.sign(
        KeyId=key_id,
        Message=hashlib.sha256(manifest).digest(),
        MessageType="DIGEST",
        SigningAlgorithm="ECDSA_SHA_256",
    )["Signature"]
    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key_id)["PublicKey"])
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ValueError(f"KMS key {key_id} is not an ECC_NIST_P256 signing key")
    write_signature(bundle_dir, signature, public)
    trust = BundleTrust.from_public_keys([public])
    load_bundle(bundle_dir, trust=trust)  # the runtime's own check, before anything is published
    return base64.b64encode(signature).decode(), public_key_fingerprint(public), trust


def release_candidate(
    clients: Clients,
    bundle_dir: Path,
    env: Mapping[str, str],
    release: str,
    run_dir: Path | None = None,
    *,
    training_job: str | None = None,
    config: str | None = None,
) -> dict[str, Any]:
    """Gate, sign and publish ``bundle_dir``; write and return the verdict record (with provenance).

    The record goes to ``releases/<release>/verdict.json`` in the records
    bucket; ``training_job`` and ``config`` (the training TOML) are recorded
    with it when given.
    """
    artifact_bucket = env["HEALTHDIAG_ARTIFACT_BUCKET"]
    candidate = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    thresholds = load_config({"Gate": json.loads(env.get("HEALTHDIAG_GATE", "{}"))}).gate
    production = production_manifest(clients, artifact_bucket, env["HEALTHDIAG_FLEET_GROUP"])
    verdict = evaluate_gate(candidate, thresholds, production)
    record: dict[str, Any] = {
        "release": release,
        **({"training_job": training_job} if training_job else {}),
        **({"config": config} if config else {}),
        "version": candidate["version"],
        **verdict.to_dict(),
        **_provenance(run_dir),
    }
    if verdict.passed:
        digest = hashlib.sha256((bundle_dir / MANIFEST_NAME).read_bytes()).digest()
        signature, fingerprint, trust = sign_bundle_with_kms(
            clients.kms, env["HEALTHDIAG_SIGNING_KEY"], bundle_dir
        )
        record["manifest_sha256"] = digest.hex()
        record["manifest_signature"] = signature
        record["signing_key_fingerprint"] = fingerprint
        record["publish"] = publish(clients, bundle_dir, artifact_bucket, trust=trust)
        # The state machine merges this into the groups' deployments (SDK member names).
        record["component"] = {MODEL_COMPONENT: {"ComponentVersion": candidate["version"]}}
    clients.s3.put_object(
        Bucket=env["HEALTHDIAG_RECORDS_BUCKET"],
        Key=f"releases/{release}/verdict.json",
        Body=json.dumps(record, indent=2).encode(),
        ContentType="application/json",
        ChecksumAlgorithm="SHA256",
    )
    return record


def run_training(command: Sequence[str]) -> None:
    """Run ``python -m training pipeline ...`` (the default ``train`` of :func:`main`)."""
    subprocess.run(list(command), check=True)


def weights_argument(ml: Path) -> list[str]:
    """``--weights FILE`` from the ``weights`` channel (``weights/`` in the artifact bucket), if any.

    The training configs name pretrained weights by a path outside the image (a
    checkout's ``../shared/data/weights``); in SageMaker they arrive as a channel.
    One ``.pth`` file there replaces the config's; none keeps it (and a config
    without weights trains from random initialisation, as it says).
    """
    channel = ml / "input/data/weights"
    files = sorted(channel.glob("*.pth")) if channel.is_dir() else []
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ValueError(f"the weights channel holds {len(files)} .pth files ({names}); keep one")
    return ["--weights", str(files[0])] if files else []


def main(
    ml_root: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    clients: Clients | None = None,
    train: Callable[[Sequence[str]], None] = run_training,
) -> int:
    """Choose the run, train the candidate, release it (gate, sign, publish) and write the verdict.

    ``ml_root`` (default ``$HEALTHDIAG_ML_ROOT`` or ``/opt/ml``), ``environ``
    (default ``os.environ``), ``clients`` and ``train`` are for tests; SageMaker
    runs ``train`` (the image's command) with none of them.
    """
    env = dict(os.environ if environ is None else environ)
    ml = ml_root or Path(env.get("HEALTHDIAG_ML_ROOT") or ML)
    try:
        hyper = json.loads((ml / "input/config/hyperparameters.json").read_text(encoding="utf-8"))
        clients = clients or Clients.create()
        fleet = env["HEALTHDIAG_FLEET_GROUP"]
        choice = choose_run(
            hyper,
            published=lambda: list_versions(clients),
            production=lambda: deployed_versions(clients, [fleet])[fleet],
        )
        print(json.dumps({"release": choice.release, "version": choice.version, "config": choice.config}))
        run, bundle = ml / "model/run", ml / "model/bundle"
        train(
            [
                sys.executable,
                "-m",
                "training",
                "pipeline",
                "--config",
                choice.config,
                "--data",
                str(ml / "input/data/data/kermany_pneumonia_224"),
                "--out",
                str(run),
                "--bundle",
                str(bundle),
                "--version",
                choice.version,
                *weights_argument(ml),
            ]
        )
        record = release_candidate(
            clients,
            bundle,
            env,
            choice.release,
            run_dir=run,
            training_job=env.get("TRAINING_JOB_NAME"),
            config=choice.config,
        )
    except Exception as exc:
        # SageMaker shows /opt/ml/output/failure as the job's FailureReason (first 1024 characters).
        failure = ml / "output/failure"
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(f"{type(exc).__name__}: {exc}"[:1024], encoding="utf-8")
        raise
    print(json.dumps({k: record[k] for k in ("release", "version", "passed")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
