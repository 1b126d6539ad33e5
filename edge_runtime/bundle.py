"""Model bundles: a folder with model file(s) and a ``manifest.json``.

The manifest (:class:`~edge_runtime.manifest.Manifest`) is the contract
between training and the edge: which labels the model predicts, what its
input looks like, how to preprocess, at which threshold to decide, and the
sha256 of every file. Loading first checks the manifest's signature
(:mod:`edge_runtime.signing`) against the trusted keys, then refuses a bundle
whose files do not match their hashes, so neither a half-copied nor a
tampered model (hashes rewritten included) can run on a patient's scan.

``write_manifest`` is used by ``training/`` to produce bundles; the edge only
reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ModelBundleError
from .manifest import BUNDLE_FORMAT, MANIFEST_NAME, Manifest, parse_manifest
from .preprocess import PreprocessSpec
from .signing import NOT_CHECKED, SIGNATURE_NAME, BundleTrust, SignatureCheck, verify_manifest_signature

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "BundleTrust",
    "ModelArtifact",
    "ModelBundle",
    "default_bundle_path",
    "load_bundle",
    "sha256_file",
    "write_manifest",
]


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def default_bundle_path() -> Path:
    """The model bundled with the package (``edge_runtime/models/pneumonia-cxr``)."""
    return Path(str(resources.files("edge_runtime") / "models" / "pneumonia-cxr"))


@dataclass(frozen=True)
class ModelArtifact:
    """One model file and the backend that runs it."""

    file: str
    backend: str
    quantization: str
    path: Path
    sha256: str
    #: CPUs (by :func:`edge_runtime.cpu.cpu_summary` ``int8_dot``) the file may run on; empty = any.
    requires_int8_dot: tuple[str, ...] = ()
    #: The id the model file's own metadata must carry (None: bundles before 0.3).
    model_id: str | None = None


@dataclass(frozen=True)
class ModelBundle:
    """A verified model bundle. Build with :func:`load_bundle`."""

    path: Path
    manifest: Manifest
    preprocessing: PreprocessSpec
    #: Who signed the manifest; unverified only where Model.RequireSignature is false.
    signature: SignatureCheck = NOT_CHECKED

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def positive_label(self) -> str:
        return self.manifest.positive_label

    @property
    def threshold(self) -> float:
        return self.manifest.threshold

    @property
    def input_name(self) -> str:
        return self.manifest.input.name

    @property
    def input_shape(self) -> list[int | str]:
        return list(self.manifest.input.shape)

    @property
    def output_activation(self) -> str:
        return self.manifest.output.activation

    @property
    def intended_use(self) -> dict[str, Any]:
        return self.manifest.intended_use.model_dump()

    @property
    def backends(self) -> list[str]:
        """The backends this bundle has a model file for, in manifest order."""
        return [artifact.backend for artifact in self.manifest.artifacts]

    def artifact(self, backend: str) -> ModelArtifact:
        """The model file for ``backend``, or a clear error listing what the bundle has."""
        for item in self.manifest.artifacts:
            if item.backend == backend:
                return ModelArtifact(
                    file=item.file,
                    backend=backend,
                    quantization=item.quantization,
                    path=self.path / item.file,
                    sha256=self.manifest.files[item.file],
                    requires_int8_dot=tuple(item.requires_int8_dot),
                    model_id=item.model_id,
                )
        raise ModelBundleError(
            f"Model bundle {self.path} has no model file for backend {backend!r} "
            f"(it has: {', '.join(sorted(set(self.backends))) or 'none'}).",
            action="Set Model.Backend to one of those, or deploy a bundle built for this backend.",
        )


def _read_manifest_bytes(bundle_dir: Path) -> bytes:
    manifest_path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise ModelBundleError(f"Model bundle folder {bundle_dir} does not exist.")
    if not manifest_path.is_file():
        raise ModelBundleError(f"Model bundle {bundle_dir} has no {MANIFEST_NAME}.")
    try:
        return manifest_path.read_bytes()
    except OSError as exc:
        raise ModelBundleError(f"Cannot read {manifest_path}: {exc}.") from exc


def _parse_manifest(data_bytes: bytes, manifest_path: Path) -> Manifest:
    try:
        data = json.loads(data_bytes.decode("utf-8"))
    except ValueError as exc:
        raise ModelBundleError(f"Cannot read {manifest_path}: {exc}.") from exc
    if not isinstance(data, dict):
        raise ModelBundleError(f"{manifest_path} must hold a JSON object.")
    return parse_manifest(data, str(manifest_path))


def load_bundle(
    bundle_dir: str | Path, *, verify_hashes: bool = True, trust: BundleTrust | None = None
) -> ModelBundle:
    """Read and verify a model bundle: signature first, then every file's hash.

    The manifest is read once; the signature is checked over those bytes and
    the same bytes are parsed, so the manifest cannot change between the check
    and its use.

    Args:
        trust: the signers to believe. None: :meth:`BundleTrust.configured`
            (the defaults, i.e. the bundled models' key, plus
            ``EDGE_RUNTIME__MODEL__TRUSTED_KEYS`` / ``..._REQUIRE_SIGNATURE``).

    Raises:
        ModelBundleError: unsigned or not signed by a trusted key (unless the
            trust allows it), or naming the file that is missing or altered.
    """
    path = Path(bundle_dir).resolve()
    raw = _read_manifest_bytes(path)
    signature = verify_manifest_signature(path, raw, BundleTrust.configured() if trust is None else trust)
    manifest = _parse_manifest(raw, path / MANIFEST_NAME)
    if verify_hashes:
        for name, expected in manifest.files.items():
            file_path = path / name
            if not file_path.is_file():
                raise ModelBundleError(
                    f"Model bundle {path} is incomplete: {name} is listed in the manifest but missing."
                )
            actual = sha256_file(file_path)
            if actual != expected:
                raise ModelBundleError(
                    f"Model file {file_path} does not match its manifest: sha256 is {actual[:12]}…, "
                    f"expected {expected[:12]}…. The file was altered or only partly copied.",
                    action="Redeploy the model component so the bundle is copied again intact.",
                )
    return ModelBundle(
        path=path, manifest=manifest, preprocessing=manifest.preprocessing_spec, signature=signature
    )


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Complete ``manifest`` with file hashes, validate it as :class:`Manifest`, write it.

    Every regular file in the folder except the manifest and its signature
    (which signs the manifest, so cannot be listed in it) is hashed, so the
    model card and any label files are protected too. Writing the manifest
    invalidates an existing signature: sign after the last call. The keys are written
    in the order given (the file is for people too).
    """
    path = Path(bundle_dir)
    data = dict(manifest)
    data["format"] = BUNDLE_FORMAT
    data.setdefault("created_utc", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    data["files"] = {
        p.relative_to(path).as_posix(): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, SIGNATURE_NAME)
    }
    out = path / MANIFEST_NAME
    parse_manifest(data, str(out))
    # A signature of the previous manifest would only make the new one look tampered with.
    (path / SIGNATURE_NAME).unlink(missing_ok=True)
    out.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out
