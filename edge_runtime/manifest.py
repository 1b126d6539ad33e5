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
    "DriftReference",
    "FeaturesSpec",
    "HeatmapSpec",
    "Histogram",
    "InputSpec",
    "IntendedUse",
    "Manifest",
    "Monitoring",
    "OodFit",
    "OodSpec",
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
    #: This file computes the pooled-features output named in ``output.features`` (what the
    #: out-of-distribution score reads; bundles before 0.4.0: False).
    features: bool = False


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


class FeaturesSpec(_Strict):
    """A model output of pooled activations, computed in the same run as the scores.

    ``[batch, sum(dims)]``: the global average of each named layer's feature map, concatenated
    in ``layers`` order. The out-of-distribution score (:mod:`edge_runtime.ood`) reads it, so a
    scan is never run twice to be judged in or out of scope.
    """

    name: str = Field(min_length=1)
    layers: list[str] = Field(min_length=1)
    dims: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_dim_per_layer(self) -> FeaturesSpec:
        if len(self.layers) != len(self.dims) or any(d < 1 for d in self.dims):
            raise ValueError("output.features needs one positive width in 'dims' per entry of 'layers'")
        return self

    @property
    def width(self) -> int:
        return sum(self.dims)


class OutputSpec(_Strict):
    name: str | None = None
    #: What turns the model's output into probabilities (``none``: it outputs them).
    activation: Literal["softmax", "sigmoid", "none"] = "none"
    #: The heat-map output, if the model files have one (see ``Artifact.heatmap``).
    heatmap: HeatmapSpec | None = None
    #: The pooled-features output, if the model files have one (see ``Artifact.features``).
    features: FeaturesSpec | None = None


class OperatingPoint(_Described):
    threshold: float = Field(ge=0.0, le=1.0)
    rule: str | None = None
    method: str | None = None


class OodFit(_Described):
    """One backend's out-of-distribution statistics (a bundle file) and threshold."""

    file: str = Field(min_length=1)
    threshold: float


class OodSpec(_Described):
    """How the bundle tells an image like its training data from one that is not.

    ``stage-mahalanobis``: per layer of ``output.features``, the Mahalanobis distance of the
    scan's pooled activations to the training split's (shrinkage covariance), log-scaled and
    standardised on the training split; the layers' values are summed. Above ``threshold``
    (set on validation) the scan is outside the intended use. The fitted statistics are the
    bundle file ``file`` (:mod:`edge_runtime.ood` reads and scores them).
    """

    method: Literal["stage-mahalanobis"] = "stage-mahalanobis"
    file: str = Field(min_length=1)
    threshold: float
    #: A backend whose file quantizes with its own scales has its own statistics, fitted the
    #: same way on its own features (``file`` and ``threshold`` above are ONNX Runtime's).
    by_backend: dict[str, OodFit] = Field(default_factory=dict)

    def for_backend(self, backend: str) -> OodFit:
        """The statistics file and threshold that apply to ``backend``'s features."""
        return self.by_backend.get(backend) or OodFit(file=self.file, threshold=self.threshold)

    @property
    def files(self) -> list[str]:
        return [self.file, *(fit.file for fit in self.by_backend.values())]


class IntendedUse(_Described):
    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    view_positions: list[str] = Field(default_factory=list)
    population: str | None = None
    #: Inclusive patient-age range in years the model was made for; None: age is not checked.
    age_years: tuple[float, float] | None = None
    #: The out-of-distribution check; None: the model has none (bundles before 0.4.0).
    ood: OodSpec | None = None
    not_for_diagnostic_use: bool = True

    @field_validator("age_years")
    @classmethod
    def _ordered_ages(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError("age_years is [youngest, oldest], both at least 0")
        return value


class Histogram(_Strict):
    """A distribution as bin edges and the share of images in each bin (the shares sum to 1)."""

    edges: list[float] = Field(min_length=2)
    shares: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Histogram:
        if len(self.edges) != len(self.shares) + 1:
            raise ValueError("a histogram has one more edge than shares")
        if any(b <= a for a, b in zip(self.edges[:-1], self.edges[1:], strict=True)):
            raise ValueError("histogram edges must increase")
        if any(s < 0 for s in self.shares) or abs(sum(self.shares) - 1.0) > 1e-6:
            raise ValueError("histogram shares are non-negative and sum to 1")
        return self


class DriftReference(_Described):
    """What the model's validation images looked like to it, to compare a site's recent scans with.

    Measured on validation through the INT8 model (``training package``); a box's drift
    monitor (:mod:`edge_runtime.drift`) compares its rolling windows with these. Header
    metadata has no reference here when the training images carried no header (JPEG/PNG);
    the monitor then compares a site with its own first window.
    """

    images: int = Field(ge=1)
    #: Share of validation images outside the intended use (the OOD threshold's own rate).
    outside_share: float = Field(ge=0.0, le=1.0)
    positive_share: float = Field(ge=0.0, le=1.0)
    mean_probability: float = Field(ge=0.0, le=1.0)
    #: P(positive) and OOD-score distributions (bins: deciles of validation, open ends).
    probability: Histogram
    ood_score: Histogram | None = None
    #: Header field -> value -> share, where the training images had headers.
    metadata: dict[str, dict[str, float]] = Field(default_factory=dict)


class Monitoring(_Described):
    reference: DriftReference


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
    #: What drift monitoring compares a site with (bundles before 0.4.0: none).
    monitoring: Monitoring | None = None
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
            ood = self.intended_use.ood
            unlisted = [file for file in (ood.files if ood is not None else []) if file not in self.files]
            if unlisted:
                raise ValueError(f"'intended_use.ood' names {', '.join(unlisted)}; 'files' does not list it")
        if self.output.heatmap is None and any(a.heatmap for a in self.artifacts):
            raise ValueError("an artifact says it has a heat-map, but 'output.heatmap' names none")
        if self.output.features is None and any(a.features for a in self.artifacts):
            raise ValueError("an artifact says it has a features output, but 'output.features' names none")
        if self.intended_use.ood is not None:
            if self.output.features is None:
                raise ValueError(
                    "'intended_use.ood' reads 'output.features', which the manifest does not name"
                )
            missing = [a.file for a in self.artifacts if not a.features]
            if missing:
                raise ValueError(
                    f"'intended_use.ood' needs the features output in every model file; "
                    f"{', '.join(missing)} has none"
                )
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

    def features_output(self, backend: str) -> str | None:
        """The features output's name in ``backend``'s model file, or None when it has none."""
        if self.output.features is None:
            return None
        for artifact in self.artifacts:
            if artifact.backend == backend:
                return self.output.features.name if artifact.features else None
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
