"""``python -m cdk.release trust``: make a thing group's runtime trust the pipeline's signing key.

The release pipeline signs each manifest with an asymmetric KMS key; boxes
refuse bundles signed by a key that is not in their ``Model.TrustedKeys``.
The runtime ships trusting only the key of its bundled models, so each fleet
is told once (before its first signed release) which key its bundles come with.
"""

from __future__ import annotations

import json
from typing import Any

from .release import RUNTIME_COMPONENT, Clients, ReleaseError, revise_deployment

__all__ = ["trust_signing_key"]


def trust_signing_key(
    clients: Clients, group: str, key_id: str, *, keep_bundled_key: bool = False
) -> dict[str, Any]:
    """Make ``group``'s runtime trust the KMS key that signs released bundles.

    The public key (KMS ``GetPublicKey``, an ECC_NIST_P256 key) is merged into
    the runtime component's ``configurationUpdate`` as ``Model.TrustedKeys``
    (inline PEM) with ``Model.RequireSignature: true``; every other component
    and setting of the group's deployment is kept. Production boxes should
    trust only this key: ``keep_bundled_key`` also keeps the key of the models
    bundled inside the runtime (development fleets).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edge_runtime.signing import bundled_models_key_path, load_public_key, public_key_fingerprint

    public = serialization.load_der_public_key(clients.kms.get_public_key(KeyId=key_id)["PublicKey"])
    if not (isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"):
        raise ReleaseError(
            f"KMS key {key_id} is not an ECC_NIST_P256 key; bundles are signed with ECDSA P-256.",
            "Pass the pipeline's signing key (the artifacts stack's SigningKey output).",
        )
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    keys = [pem]
    if keep_bundled_key:
        keys.append(bundled_models_key_path().read_text(encoding="utf-8"))
    fingerprint = public_key_fingerprint(load_public_key(pem))

    def trust_keys(components: dict[str, dict[str, Any]]) -> None:
        if RUNTIME_COMPONENT not in components:
            raise ReleaseError(
                f"The deployment of {group!r} has no {RUNTIME_COMPONENT}, so there is no runtime to "
                "configure.",
                "Deploy the runtime component to the group first (components/build.py and the README's "
                "Greengrass section), then run 'trust' again.",
            )
        runtime = components[RUNTIME_COMPONENT]
        update = dict(runtime.get("configurationUpdate") or {})
        merge = json.loads(update.get("merge") or "{}")
        merge.setdefault("Model", {}).update({"TrustedKeys": keys, "RequireSignature": True})
        update["merge"] = json.dumps(merge, separators=(",", ":"), sort_keys=True)
        runtime["configurationUpdate"] = update

    _, _, created = revise_deployment(
        clients,
        group,
        trust_keys,
        name=f"{group}: trust signing key {fingerprint[:12]}",
        tag=f"trust {fingerprint[:16]}",
    )
    return {
        "group": group,
        "trusted_fingerprints": [public_key_fingerprint(load_public_key(k)) for k in keys],
        "deploymentId": created["deploymentId"],
    }
