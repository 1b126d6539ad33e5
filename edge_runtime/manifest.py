"""The model manifest: one typed contract between training and the edge.

``training package`` writes it (through :func:`edge_runtime.bundle.write_manifest`)
and the edge loads it, both through :class:`Manifest`, so a bundle the edge
would refuse cannot be built. Like the runtime configuration it is strict:
an unknown key in a section the runtime acts on is an error, not a silent
no-op. Sections that only describe the model to people (``training``,
``metrics``, ``calibration``) are free-form.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ModelBundleError
from .preprocess import PreprocessSpec

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST_NAME",
    "Artifact",
    "ConformanceSpec",
    "HeatmapSpec",
    "InputSpec",
    "IntendedUse",
    "Manifest",
    "OperatingPoint",
    "OutputSpec",
    "parse_manifest",
]

BUNDLE_FORMAT = "healthdiag.model-bundle/1"
#: The manifest's file name in a bundle folder (what the bundle signature covers).
MANIFEST_NAME = "manifest.json"
#: Key in an ONNX model's metadata_props naming the model id the manifest records for it.
ONNX_MODEL_ID_KEY = "healthdiag.model_id"

_SHA256 = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Described(BaseModel):
    """Sections whose extra keys document the model for people (kept, not acted on)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Artifact(_Strict):
    """One model file and the backend that runs it."""

    file: str
    backend: str
    quantization: str = "none"
    #: CPUs (``edge_runtime.cpu.cpu_summary()['int8_dot']``) the file may run on; empty = any.
    requires_int8_dot: tuple[str, ...] = ()
    #: Written into the model file's own metadata too, so a model and a manifest that do not
    #: belong together are refused (ONNX: ``healthdiag.model_id`` in metadata_props).
    model_id: str | None = Field(None, pattern=_SHA256)
    #: This file computes the heat-map output named in ``output.heatmap`` (bundles before 0.3.0
    #: and converters that could not carry it: False, and results have no heat-map).
    heatmap: bool = False


class InputSpec(_Strict):
    name: str
    shape: list[int | str]
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW", "NHWC"] = "NCHW"


class HeatmapSpec(_Strict):
    """A second model output that says where the model looked, computed in the same run.

    ``class-activation``: ``[batch, classes, h, w]`` per-class logit maps of the
    last convolutional features weighted by the classifier (their spatial mean
    is the logits), on the model's own coarse grid; the edge upsamples them.
    """

    name: str = Field(min_length=1)
    kind: Literal["class-activation"] = "class-activation"


class OutputSpec(_Strict):
    name: str | None = None
    #: What turns the model's output into probabilities (``none``: it outputs them).
    activation: Literal["softmax", "sigmoid", "none"] = "none"
    #: The heat-map output, if the model files have one (see ``Artifact.heatmap``).
    heatmap: HeatmapSpec | None = None


class OperatingPoint(_Described):
    threshold: float = Field(ge=0.0, le=1.0)
    rule: str | None = None
    method: str | None = None


class IntendedUse(_Described):
    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    view_positions: list[str] = Field(default_factory=list)
    population: str | None = None
    not_for_diagnostic_use: bool = True


class ConformanceSpec(_Described):
    """The reference set checked at every load (:mod:`edge_runtime.conformance`)."""

    file: str
    max_abs_diff: float = Field(ge=0.0, le=1.0)
    decision_margin: float = Field(ge=0.0, le=1.0)
    #: Allowed |p - p_build| for the same backend (None: max_abs_diff applies).
    max_drift: float | None = Field(None, ge=0.0, le=1.0)
    images: int | None = None
    #: Heat-map checks (where the set holds reference maps, ``cam_*``): largest difference of
    #: the normalised positive-class map (see :func:`edge_runtime.heat.heat_difference`)
    #: from the same backend on the build machine, and from the FP32 model.
    heatmap_max_drift: float | None = Field(None, ge=0.0, le=1.0)
    heatmap_max_abs_diff: float | None = Field(None, ge=0.0, le=1.0)


class Manifest(_Strict):
    """``manifest.json`` of a model bundle."""

    format: Literal["healthdiag.model-bundle/1"] = "healthdiag.model-bundle/1"
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str = ""
    labels: list[str] = Field(min_length=1)
    positive_label: str
    artifacts: list[Artifact] = Field(min_length=1)
    input: InputSpec
    output: OutputSpec = Field(default_factory=OutputSpec)
    preprocessing: dict[str, Any]
    operating_point: OperatingPoint
    intended_use: IntendedUse = Field(default_factory=IntendedUse)
    conformance: ConformanceSpec | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    created_utc: str | None = None
    #: sha256 of every file of the bundle but the manifest itself.
    files: dict[str, str] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _hex_hashes(cls, files: dict[str, str]) -> dict[str, str]:
        bad = [name for name, digest in files.items() if len(digest) != 64 or not _is_hex(digest)]
        if bad:
            raise ValueError(f"not a sha256 hex digest for {', '.join(bad)}")
        return files

    @field_validator("preprocessing")
    @classmethod
    def _valid_preprocessing(cls, value: dict[str, Any]) -> dict[str, Any]:
        PreprocessSpec.from_dict(value)  # raises with the offending key
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.positive_label not in self.labels:
            raise ValueError(f"positive_label {self.positive_label!r} is not one of {self.labels}")
        if self.files:
            for artifact in self.artifacts:
                if artifact.file not in self.files:
                    raise ValueError(f"model file {artifact.file!r} has no sha256 in 'files'")
            if self.conformance is not None and self.conformance.file not in self.files:
                raise ValueError("'conformance' must name a reference-set file listed in 'files'")
        if self.output.heatmap is None and any(a.heatmap for a in self.artifacts):
            raise ValueError("an artifact says it has a heat-map, but 'output.heatmap' names none")
        sample = list(self.preprocessing_spec.sample_shape)
        if len(self.input.shape) == 4 and list(self.input.shape[1:]) != sample:
            raise ValueError(
                f"input shape {self.input.shape} disagrees with the preprocessing spec, which "
                f"produces {sample} per sample"
            )
        return self

    @property
    def preprocessing_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocessing)

    @property
    def threshold(self) -> float:
        return self.operating_point.threshold

    def heatmap_output(self, backend: str) -> str | None:
        """The heat-map output's name in ``backend``'s model file, or None when it has none."""
        if self.output.heatmap is None:
            return None
        for artifact in self.artifacts:
            if artifact.backend == backend:
                return self.output.heatmap.name if artifact.heatmap else None
        return None

    def to_json_dict(self) -> dict[str, Any]:
        """As written to ``manifest.json`` (documentation keys kept, unset optional keys left out)."""
        return self.model_dump(mode="json", exclude_none=True)


def parse_manifest(data: Any, source: str) -> Manifest:
    """Validate a manifest; errors name every offending key, as the configuration's do."""
    if isinstance(data, dict) and data.get("format", BUNDLE_FORMAT) != BUNDLE_FORMAT:
        raise ModelBundleError(
            f"{source} has format {data['format']!r}; this runtime reads {BUNDLE_FORMAT!r}.",
            action="Update the edge runtime component, or repackage the model for this version.",
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}" for err in exc.errors()
        )
        raise ModelBundleError(
            f"{source} is not a valid model manifest: {problems}.",
            action="Repackage the model with 'python -m training package' (it writes a valid "
            "manifest), or redeploy the model component.",
        ) from None


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
