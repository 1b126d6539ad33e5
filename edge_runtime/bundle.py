"""Model bundles: a folder with model file(s) and a ``manifest.json``.

The manifest is the contract between training and the edge: which labels the
model predicts, what its input looks like, how to preprocess, at which
threshold to decide, and the sha256 of every file. Loading refuses a bundle
whose files do not match their hashes, so a half-copied or tampered model can
never run on a patient's scan.

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
from .preprocess import PreprocessSpec

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST_NAME",
    "ModelArtifact",
    "ModelBundle",
    "default_bundle_path",
    "load_bundle",
    "sha256_file",
    "write_manifest",
]

BUNDLE_FORMAT = "healthdiag.model-bundle/1"
MANIFEST_NAME = "manifest.json"
_ACTIVATIONS = ("softmax", "sigmoid", "none")
_REQUIRED = (
    "format",
    "name",
    "version",
    "labels",
    "positive_label",
    "artifacts",
    "files",
    "input",
    "output",
    "preprocessing",
    "operating_point",
)


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


@dataclass(frozen=True)
class ModelBundle:
    """A verified model bundle. Build with :func:`load_bundle`."""

    path: Path
    manifest: dict[str, Any]
    preprocessing: PreprocessSpec

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def positive_label(self) -> str:
        return str(self.manifest["positive_label"])

    @property
    def threshold(self) -> float:
        return float(self.manifest["operating_point"]["threshold"])

    @property
    def input_name(self) -> str:
        return str(self.manifest["input"]["name"])

    @property
    def input_shape(self) -> list[int | str]:
        return list(self.manifest["input"]["shape"])

    @property
    def output_activation(self) -> str:
        return str(self.manifest["output"].get("activation", "none"))

    @property
    def intended_use(self) -> dict[str, Any]:
        return dict(self.manifest.get("intended_use", {}))

    def artifact(self, backend: str) -> ModelArtifact:
        """The model file for ``backend``, or a clear error listing what the bundle has."""
        for item in self.manifest["artifacts"]:
            if item["backend"] == backend:
                return ModelArtifact(
                    file=item["file"],
                    backend=backend,
                    quantization=item.get("quantization", "none"),
                    path=self.path / item["file"],
                    sha256=self.manifest["files"][item["file"]],
                    requires_int8_dot=tuple(item.get("requires_int8_dot", ())),
                )
        available = sorted({item["backend"] for item in self.manifest["artifacts"]})
        raise ModelBundleError(
            f"Model bundle {self.path} has no model file for backend {backend!r} "
            f"(it has: {', '.join(available) or 'none'}).",
            action="Set Model.Backend to one of those, or deploy a bundle built for this backend.",
        )


def _read_manifest(bundle_dir: Path) -> dict[str, Any]:
    manifest_path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise ModelBundleError(f"Model bundle folder {bundle_dir} does not exist.")
    if not manifest_path.is_file():
        raise ModelBundleError(f"Model bundle {bundle_dir} has no {MANIFEST_NAME}.")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelBundleError(f"Cannot read {manifest_path}: {exc}.") from exc
    if not isinstance(manifest, dict):
        raise ModelBundleError(f"{manifest_path} must hold a JSON object.")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise ModelBundleError(f"{manifest_path} lacks required keys: {', '.join(missing)}.")
    if manifest["format"] != BUNDLE_FORMAT:
        raise ModelBundleError(
            f"{manifest_path} has format {manifest['format']!r}; this runtime reads {BUNDLE_FORMAT!r}.",
            action="Update the edge runtime component, or repackage the model for this version.",
        )
    return manifest


def _check_consistency(manifest: dict[str, Any], manifest_path: Path) -> None:
    labels = manifest["labels"]
    if not isinstance(labels, list) or len(labels) < 1:
        raise ModelBundleError(f"{manifest_path}: 'labels' must be a non-empty list.")
    if manifest["positive_label"] not in labels:
        raise ModelBundleError(
            f"{manifest_path}: positive_label {manifest['positive_label']!r} is not one of {labels}."
        )
    threshold = manifest["operating_point"].get("threshold")
    if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ModelBundleError(f"{manifest_path}: operating_point.threshold must be in [0, 1].")
    activation = manifest["output"].get("activation", "none")
    if activation not in _ACTIVATIONS:
        raise ModelBundleError(
            f"{manifest_path}: output.activation {activation!r} is not one of {_ACTIVATIONS}."
        )
    conformance = manifest.get("conformance")
    if conformance is not None:
        if not isinstance(conformance, dict) or conformance.get("file") not in manifest["files"]:
            raise ModelBundleError(
                f"{manifest_path}: 'conformance' must name a reference-set file listed in 'files'."
            )
        for key in ("max_abs_diff", "decision_margin", "max_drift"):
            value = conformance.get(key, 0.0 if key == "max_drift" else None)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ModelBundleError(f"{manifest_path}: conformance.{key} must be a number in [0, 1].")
    for item in manifest["artifacts"]:
        if item.get("file") not in manifest["files"]:
            raise ModelBundleError(
                f"{manifest_path}: model file {item.get('file')!r} has no sha256 in 'files'."
            )


def load_bundle(bundle_dir: str | Path, *, verify_hashes: bool = True) -> ModelBundle:
    """Read and verify a model bundle.

    Raises:
        ModelBundleError: naming the file that is missing or altered.
    """
    path = Path(bundle_dir).resolve()
    manifest = _read_manifest(path)
    manifest_path = path / MANIFEST_NAME
    _check_consistency(manifest, manifest_path)
    if verify_hashes:
        for name, expected in manifest["files"].items():
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
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    input_shape = manifest["input"].get("shape", [])
    if len(input_shape) == 4 and list(input_shape[1:]) != list(spec.sample_shape):
        raise ModelBundleError(
            f"{manifest_path}: input shape {input_shape} disagrees with the preprocessing spec, "
            f"which produces {list(spec.sample_shape)} per sample."
        )
    return ModelBundle(path=path, manifest=manifest, preprocessing=spec)


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Complete ``manifest`` with file hashes and write it into ``bundle_dir``.

    Every regular file in the folder except the manifest is hashed, so the
    model card and any label files are protected too.
    """
    path = Path(bundle_dir)
    data = dict(manifest)
    data["format"] = BUNDLE_FORMAT
    data.setdefault("created_utc", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    data["files"] = {
        p.relative_to(path).as_posix(): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    _check_consistency(data, path / MANIFEST_NAME)
    PreprocessSpec.from_dict(data["preprocessing"])
    out = path / MANIFEST_NAME
    out.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out
