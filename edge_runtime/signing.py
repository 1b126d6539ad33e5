"""Who built a model bundle: an ECDSA P-256 signature over its ``manifest.json``.

The manifest lists the sha256 of every file of the bundle, so hashes alone
only prove that the files belong to *some* manifest: whoever can write the
bundle folder can rewrite a hash (and the threshold) too. The signature ties
the manifest's exact bytes to a key the site trusts, so the runtime checks it
before it believes a single hash (issue 14, item 7).

The signature lives beside the manifest in ``manifest.sig.json``::

    {"format": "healthdiag.bundle-signature/1",
     "algorithm": "ecdsa-p256-sha256",
     "key_fingerprint": "<sha256 hex of the public key's DER SubjectPublicKeyInfo>",
     "signature": "<base64 DER ECDSA signature>"}

ECDSA P-256 with SHA-256 over the manifest bytes is exactly what AWS KMS
computes for ``Sign(MessageType=DIGEST, SigningAlgorithm=ECDSA_SHA_256)`` on
``sha256(manifest.json)``, so the release pipeline's KMS key and a local
development key (``python -m training keygen``) produce the same file.

Keys are trusted by fingerprint: :class:`BundleTrust` is built from
``Model.TrustedKeys`` (PEM files or inline PEM text) and
``Model.RequireSignature``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import ModelBundleError
from .keyfiles import BUNDLED_MODELS_KEY, _p256, bundled_models_key_path, load_public_key
from .manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = [
    "BUNDLED_MODELS_KEY",
    "NOT_CHECKED",
    "SIGNATURE_ALGORITHM",
    "SIGNATURE_FORMAT",
    "SIGNATURE_NAME",
    "BundleTrust",
    "SignatureCheck",
    "TrustedKey",
    "bundled_models_key_path",
    "generate_signing_key",
    "load_private_key",
    "load_public_key",
    "public_key_fingerprint",
    "sign_manifest",
    "trusting",
    "verify_manifest_signature",
    "write_signature",
]

log = logging.getLogger(__name__)

SIGNATURE_NAME = "manifest.sig.json"
SIGNATURE_FORMAT = "healthdiag.bundle-signature/1"
SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
_TRUST_ACTION = (
    "Deploy a bundle signed by one of the trusted keys (python -m training package --signing-key, "
    "or the release pipeline), or add its signer's public key to Model.TrustedKeys if your site "
    "trusts it. Only on a development box: Model.RequireSignature: false."
)


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """sha256 hex of the key's DER SubjectPublicKeyInfo (what ``openssl pkey -pubout -outform DER`` gives)."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM P-256 private key (development signing; production signs in KMS)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot load private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{path} is not an ECDSA P-256 private key")
    return key


def generate_signing_key(out_dir: str | Path, name: str = "bundle-signing") -> tuple[Path, Path, str]:
    """Write ``NAME.pem`` (private, mode 0600) and ``NAME.pub.pem``; return both paths and the fingerprint.

    The private file is created with 0600 from the start (not chmod-ed after
    writing), so it is never readable by others, even briefly.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path, public_key_fingerprint(key.public_key())


def write_signature(
    bundle_dir: str | Path, der_signature: bytes, public_key: ec.EllipticCurvePublicKey
) -> Path:
    """Write ``manifest.sig.json`` for a DER signature made elsewhere (KMS) or by :func:`sign_manifest`."""
    doc = {
        "format": SIGNATURE_FORMAT,
        "algorithm": SIGNATURE_ALGORITHM,
        "key_fingerprint": public_key_fingerprint(public_key),
        "signature": base64.b64encode(der_signature).decode("ascii"),
    }
    out = Path(bundle_dir) / SIGNATURE_NAME
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return out


def sign_manifest(bundle_dir: str | Path, private_key: ec.EllipticCurvePrivateKey) -> Path:
    """Sign the bundle's ``manifest.json`` as it is on disk now (call after the last ``write_manifest``)."""
    data = (Path(bundle_dir) / MANIFEST_NAME).read_bytes()
    signature = private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    return write_signature(bundle_dir, signature, private_key.public_key())


@dataclass(frozen=True)
class TrustedKey:
    fingerprint: str
    key: ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class BundleTrust:
    """Which signers the runtime believes, and whether a bundle must be signed at all.

    Build with :meth:`from_entries` / :meth:`from_config`; ``load_bundle`` without
    one uses :meth:`configured` (defaults and ``EDGE_RUNTIME__MODEL__*``).
    """

    keys: tuple[TrustedKey, ...] = ()
    require_signature: bool = True

    @classmethod
    def from_entries(cls, entries: Iterable[str | Path], *, require_signature: bool = True) -> BundleTrust:
        return cls.from_public_keys(
            [load_public_key(entry) for entry in entries], require_signature=require_signature
        )

    @classmethod
    def from_public_keys(
        cls, keys: Iterable[ec.EllipticCurvePublicKey], *, require_signature: bool = True
    ) -> BundleTrust:
        """Trust keys already in hand (a packager's own key, the KMS key's public half)."""
        trusted = tuple(TrustedKey(public_key_fingerprint(key), _p256(key, "key")) for key in keys)
        return cls(keys=trusted, require_signature=require_signature)

    @classmethod
    def from_config(cls, model: ModelConfig) -> BundleTrust:
        return cls.from_entries(model.trusted_keys, require_signature=model.require_signature)

    @classmethod
    def configured(cls) -> BundleTrust:
        """The trust this machine is configured with when no configuration object is at hand.

        Inside :func:`trusting`, that block's trust; else the defaults and
        ``EDGE_RUNTIME__MODEL__*`` environment variables.
        """
        override = _TRUST_OVERRIDE.get()
        if override is not None:
            return override
        from .config import load_config

        return cls.from_config(load_config().model)

    @property
    def fingerprints(self) -> list[str]:
        return [k.fingerprint for k in self.keys]

    def find(self, fingerprint: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.fingerprint == fingerprint), None)

    def describe(self) -> str:
        return ", ".join(self.fingerprints) or "none"


_TRUST_OVERRIDE: ContextVar[BundleTrust | None] = ContextVar("bundle_trust_override", default=None)


@contextmanager
def trusting(trust: BundleTrust) -> Iterator[BundleTrust]:
    """Make ``trust`` the default of ``load_bundle`` in this block (this thread / task only).

    For code that verifies a bundle through a caller that takes no trust
    argument, e.g. the release pipeline publishing a bundle it has just signed
    with its KMS key through ``components/build.py``.
    """
    token = _TRUST_OVERRIDE.set(trust)
    try:
        yield trust
    finally:
        _TRUST_OVERRIDE.reset(token)


@dataclass(frozen=True)
class SignatureCheck:
    """What the signature check found (shown by ``model info`` and in status messages)."""

    verified: bool
    #: Fingerprint of the signer the signature file names (None: no signature file).
    signer: str | None
    #: Why it is not verified (empty when verified).
    reason: str = ""

    @property
    def status(self) -> str:
        """``verified (<fingerprint prefix>)`` or ``not verified``: the status/health ``model.signature``."""
        return f"verified ({self.signer[:16]})" if self.verified and self.signer else "not verified"


#: A bundle object built without :func:`~edge_runtime.bundle.load_bundle` (nothing was checked).
NOT_CHECKED = SignatureCheck(verified=False, signer=None, reason="not checked")


def _read_signature(bundle_dir: Path) -> dict[str, Any] | None:
    path = bundle_dir / SIGNATURE_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelBundleError(f"Cannot read {path}: {exc}.", action=_TRUST_ACTION) from exc
    if (
        not isinstance(doc, dict)
        or doc.get("format") != SIGNATURE_FORMAT
        or doc.get("algorithm") != SIGNATURE_ALGORITHM
        or not isinstance(doc.get("key_fingerprint"), str)
        or not isinstance(doc.get("signature"), str)
    ):
        raise ModelBundleError(
            f"{path} is not a {SIGNATURE_FORMAT} signature with algorithm {SIGNATURE_ALGORITHM}.",
            action=_TRUST_ACTION,
        )
    return doc


def _check(bundle_dir: Path, manifest_bytes: bytes, trust: BundleTrust) -> SignatureCheck:
    doc = _read_signature(bundle_dir)
    if doc is None:
        return SignatureCheck(False, None, f"it is not signed (no {SIGNATURE_NAME})")
    signer = doc["key_fingerprint"].lower()
    trusted = trust.find(signer)
    if trusted is None:
        return SignatureCheck(
            False,
            signer,
            f"it is signed by key {signer}, which is not trusted (trusted: {trust.describe()})",
        )
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
        trusted.key.verify(signature, manifest_bytes, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return SignatureCheck(
            False,
            signer,
            f"its signature by trusted key {signer} does not match {bundle_dir.name}/manifest.json: "
            "the manifest was altered after signing",
        )
    return SignatureCheck(True, signer)


def verify_manifest_signature(bundle_dir: Path, manifest_bytes: bytes, trust: BundleTrust) -> SignatureCheck:
    """Check ``manifest_bytes`` (the bytes that will be parsed) against the bundle's signature file.

    Raises:
        ModelBundleError: unsigned, unknown signer or bad signature, unless
            ``trust.require_signature`` is false; then it logs a WARNING (on
            every load, so a development setting cannot go unnoticed) and
            returns an unverified check.
    """
    check = _check(bundle_dir, manifest_bytes, trust)
    if check.verified:
        return check
    if trust.require_signature:
        raise ModelBundleError(
            f"Model bundle {bundle_dir} is refused: {check.reason}. Nothing in it is trusted "
            "until its manifest is signed by a trusted key.",
            action=_TRUST_ACTION,
        )
    log.warning(
        "model bundle %s is NOT authenticated (%s) and is loaded only because "
        "Model.RequireSignature is false: anyone who can write that folder can change the model "
        "and its threshold. Never run a clinical box like this.",
        bundle_dir,
        check.reason,
    )
    return check
