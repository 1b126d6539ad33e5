"""Public keys as the configuration names them: inline PEM text or a PEM file, ECDSA P-256 only.

A leaf (cryptography only): the configuration checks ``Model.TrustedKeys`` with it at
load time, and :mod:`.signing` builds its trust from it, without either importing the other's
dependencies (the signing module sits above the bundle, which sits above the configuration).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["BUNDLED_MODELS_KEY", "bundled_models_key_path", "load_public_key"]

#: The public key of the models shipped inside the package (its private key never is).
BUNDLED_MODELS_KEY = "healthdiag-bundled-models.pub.pem"

_PEM_MARK = "-----BEGIN"


def bundled_models_key_path() -> Path:
    """The shipped public key that signs ``edge_runtime/models/*`` (trusted by default)."""
    return Path(str(resources.files("edge_runtime") / "keys" / BUNDLED_MODELS_KEY))


def _p256(key: object, where: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{where} is not an ECDSA P-256 public key")
    return key


def load_public_key(entry: str | Path) -> ec.EllipticCurvePublicKey:
    """A trusted key from a ``Model.TrustedKeys`` entry: inline PEM text, or the path of a PEM file.

    Inline text exists so a Greengrass configuration (which cannot ship files)
    can carry the key itself.

    Raises:
        ValueError: not readable, not PEM, or not a P-256 public key (the config layer names the entry).
    """
    text = str(entry)
    if _PEM_MARK in text:
        data, where = text.strip().encode("ascii", "replace") + b"\n", "inline PEM key"
    else:
        try:
            data, where = Path(text).read_bytes(), text
        except OSError as exc:
            raise ValueError(f"cannot read public key file {text}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"{where} is not a PEM public key ({exc})") from None
    return _p256(key, where)
