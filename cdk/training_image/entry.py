"""Entry point of the release pipeline's SageMaker training job (``train`` in the image).

1. ``python -m training pipeline`` on the ``data`` channel, writing the run and
   the candidate bundle under ``/opt/ml/model`` (SageMaker uploads it to
   ``candidates/`` in the artifact bucket);
2. :func:`release_candidate`: the gate against the model the fleet group runs
   now, and, only if it passed, the manifest signature (KMS, written into the
   bundle as ``manifest.sig.json`` and checked with the runtime's own
   verifier) and ``cdk.release.publish``; the verdict goes to
   ``releases/<job>/verdict.json`` in the records bucket, where the state
   machine reads it.

Environment (set by the pipeline stack): ``HEALTHDIAG_ARTIFACT_BUCKET``,
``HEALTHDIAG_RECORDS_BUCKET``, ``HEALTHDIAG_SIGNING_KEY``, ``HEALTHDIAG_GATE``
(the stack's gate thresholds as JSON), ``HEALTHDIAG_FLEET_GROUP``;
``TRAINING_JOB_NAME`` comes from SageMaker. Hyperparameters: ``version``
(the candidate's bundle version), ``config`` (a training TOML in the image).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_runtime.bundle import MANIFEST_NAME, load_bundle
from edge_runtime.signing import BundleTrust, public_key_fingerprint, write_signature

from ..config import load_config
from ..gate import evaluate_gate
from ..release import MODEL_COMPONENT, Clients, deployed_versions, publish

__all__ = ["main", "release_candidate", "sign_bundle_with_kms"]

ML = Path("/opt/ml")


def production_manifest(clients: Clients, bucket: str, fleet_group: str) -> dict[str, Any] | None:
    """The manifest of the model version the fleet group's deployment pins (None: nothing deployed)."""
    version = deployed_versions(clients, [fleet_group])[fleet_group]
    if version is None:
        return None
    body = clients.s3.get_object(Bucket=bucket, Key=f"{MODEL_COMPONENT}/{version}/pneumonia-cxr.zip")["Body"]
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
    clients: Clients, bundle_dir: Path, env: dict[str, str], release: str, run_dir: Path | None = None
) -> dict[str, Any]:
    """Gate, sign and publish ``bundle_dir``; write and return the verdict record (with provenance)."""
    artifact_bucket = env["HEALTHDIAG_ARTIFACT_BUCKET"]
    candidate = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    thresholds = load_config({"Gate": json.loads(env.get("HEALTHDIAG_GATE", "{}"))}).gate
    production = production_manifest(clients, artifact_bucket, env["HEALTHDIAG_FLEET_GROUP"])
    verdict = evaluate_gate(candidate, thresholds, production)
    record: dict[str, Any] = {
        "release": release,
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


def main() -> int:  # pragma: no cover - runs inside SageMaker
    hyper = json.loads((ML / "input/config/hyperparameters.json").read_text(encoding="utf-8"))
    config = hyper.get("config", "training/configs/kermany-efficientnet-lite0-96.toml")
    run, bundle = ML / "model/run", ML / "model/bundle"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "pipeline",
            "--config",
            config,
            "--data",
            str(ML / "input/data/data/kermany_pneumonia_224"),
            "--out",
            str(run),
            "--bundle",
            str(bundle),
            "--version",
            hyper["version"],
        ],
        check=True,
    )
    record = release_candidate(
        Clients.create(), bundle, dict(os.environ), os.environ["TRAINING_JOB_NAME"], run_dir=run
    )
    print(json.dumps({k: record[k] for k in ("release", "passed")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
