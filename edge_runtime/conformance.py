"""Does this model give the build machine's answers on *this* CPU? Checked at every load.

An INT8 model's arithmetic depends on the CPU's integer kernels (see
:mod:`edge_runtime.cpu`): the same 0.1.1 file scored test AUC 0.963 on
AVX2-only boxes and 0.948 on VNNI ones. A hash proves the file is
intact, not that this box computes what the model was validated for. So a
bundle carries a small reference set (``conformance.npz``: de-identified
training images at the model's input size, 8-bit, with the FP32 model's
probability and each shipped backend's output on the machine that built the
bundle), and whenever a bundle is loaded, at start-up, on a hot swap or a
Greengrass deployment, the selected backend runs them here:

* **drift**: ``|p - p_build|`` against the same backend on the build machine
  must stay within ``max_drift`` (the same file should compute the same
  numbers; the saturating kernels of 0.1.x moved them by up to 0.75);
* **quantization error**: ``|p - p_fp32|`` within ``max_abs_diff``;
* **decisions** at the operating point must match the build machine's,
  except for references within ``decision_margin`` of the threshold.

Where the model also computes a heat-map (``output.heatmap``) and the set
holds reference maps (``cam_reference``, FP32; ``cam_expected_<backend>``),
the map of every reference image is checked the same way, from the same
engine run: the positive-class map as it is drawn (:func:`normalised_heat`,
compared by :func:`heat_difference`) may drift from the build machine by at most
``heatmap_max_drift`` and differ from FP32 by at most ``heatmap_max_abs_diff``.
Raw logit maps are not compared: what a reader sees is the normalised map.

Where the bundle has the out-of-distribution check (``intended_use.ood``) and the set holds
the build machine's pooled features of each backend (``features_expected_<backend>``), the
out-of-distribution score of every reference image is computed from this engine's features
(the same run) and from the build machine's, with the bundle's statistics: the scores may
differ by at most ``ood_max_drift`` and the within/outside verdict must be the build
machine's, except for references within ``ood_decision_margin`` of the OOD threshold. Tampered
reference features or statistics, or a CPU that computes other features, fail here.

A bundle without per-backend outputs is compared with FP32 only. On failure
the bundle is refused exactly like a hash mismatch (:class:`ConformanceError`
is a :class:`ModelBundleError`): the old model stays, and the log and status
say which CPU features and which reference image were worst. The images run
through the same :func:`preprocess`, backend and
:func:`scores_to_probabilities` as a scan.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .backends import Backend, create_backend
from .bundle import ModelArtifact, ModelBundle
from .cpu import CpuSummary, cpu_summary
from .errors import ConformanceError, ModelBundleError
from .heat import HEAT_RANGE_FLOOR, heat_difference, normalised_heat, positive_map
from .ood import OodModel
from .ood import load as load_ood
from .preprocess import preprocess
from .results import positive_index, scores_to_probabilities

__all__ = [
    "HEAT_RANGE_FLOOR",
    "ConformanceReport",
    "ConformanceRow",
    "check_conformance",
    "enforce",
    "heat_difference",
    "normalised_heat",
    "ood_for_backend",
    "open_checked",
    "open_engine",
    "positive_map",
    "reference_inputs",
    "require_cpu_support",
    "verify_backend",
]


@dataclass(frozen=True)
class ConformanceRow:
    """One reference image: its FP32 reference, this box's output and whether it conforms."""

    index: int
    source: str
    label: int
    #: The FP32 model's P(positive), computed where the bundle was built.
    reference: float
    #: The same backend's output where the bundle was built (``reference`` when not recorded).
    expected: float
    output: float
    #: ``|output - reference|``: quantization error against FP32.
    abs_diff: float
    #: ``|output - expected|``: how far this CPU is from the build machine.
    drift: float
    near_threshold: bool
    decision_matches: bool
    ok: bool
    #: Normalised positive-class heat-map difference from FP32 / from the build machine's
    #: map of the same backend (None: no heat-map checked, see :func:`heat_difference`).
    heat_diff: float | None = None
    heat_drift: float | None = None
    #: Out-of-distribution score from this engine's features / from the build machine's
    #: features of the same backend (None: not checked).
    ood_score: float | None = None
    ood_expected: float | None = None


@dataclass(frozen=True)
class ConformanceReport:
    """The outcome of one conformance run (also what the heartbeat and ``model verify`` show)."""

    model: str
    version: str
    backend: str
    quantization: str
    cpu: CpuSummary
    threshold: float
    max_abs_diff_allowed: float
    max_drift_allowed: float
    decision_margin: float
    rows: tuple[ConformanceRow, ...]
    seconds: float
    #: Allowed heat-map differences (None: the heat-map was not checked).
    heat_max_diff_allowed: float | None = None
    heat_max_drift_allowed: float | None = None
    #: Out-of-distribution check: allowed score drift, verdict margin and threshold (None: unchecked).
    ood_max_drift_allowed: float | None = None
    ood_decision_margin: float | None = None
    ood_threshold: float | None = None

    @property
    def passed(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def heat_checked(self) -> bool:
        return any(row.heat_diff is not None for row in self.rows)

    @property
    def heat_max_diff(self) -> float | None:
        values = [row.heat_diff for row in self.rows if row.heat_diff is not None]
        return max(values) if values else None

    @property
    def heat_max_drift(self) -> float | None:
        values = [row.heat_drift for row in self.rows if row.heat_drift is not None]
        return max(values) if values else None

    @property
    def ood_checked(self) -> bool:
        return any(row.ood_score is not None for row in self.rows)

    @property
    def ood_max_drift(self) -> float | None:
        drifts = [
            abs(row.ood_score - row.ood_expected)
            for row in self.rows
            if row.ood_score is not None and row.ood_expected is not None
        ]
        return max(drifts) if drifts else None

    @property
    def ood_verdicts_differing(self) -> int:
        cut = self.ood_threshold
        if cut is None:
            return 0
        return sum(
            (row.ood_score > cut) != (row.ood_expected > cut)
            for row in self.rows
            if row.ood_score is not None and row.ood_expected is not None
        )

    @property
    def worst(self) -> ConformanceRow:
        return max(self.rows, key=lambda row: (not row.ok, row.drift, row.abs_diff))

    @property
    def max_abs_diff(self) -> float:
        return max(row.abs_diff for row in self.rows)

    @property
    def max_drift(self) -> float:
        return max(row.drift for row in self.rows)

    @property
    def decisions_differing(self) -> int:
        return sum(not row.decision_matches for row in self.rows)

    def summary(self) -> dict[str, Any]:
        """A compact JSON form: the heartbeat's ``conformance`` and the log line."""
        worst = self.worst
        return {
            "passed": self.passed,
            "model": f"{self.model} {self.version}",
            "backend": self.backend,
            "images": len(self.rows),
            "max_drift": round(self.max_drift, 6),
            "max_drift_allowed": self.max_drift_allowed,
            "max_abs_diff": round(self.max_abs_diff, 6),
            "max_abs_diff_allowed": self.max_abs_diff_allowed,
            "decisions_differing": self.decisions_differing,
            "worst": {
                "image": worst.source,
                "reference": round(worst.reference, 6),
                "expected": round(worst.expected, 6),
                "output": round(worst.output, 6),
            },
            "cpu_int8_features": list(self.cpu.get("int8_features", [])),
            "seconds": round(self.seconds, 3),
            **self._heat_summary(),
            **self._ood_summary(),
        }

    def _ood_summary(self) -> dict[str, Any]:
        if not self.ood_checked:
            return {}
        drift = self.ood_max_drift
        return {
            "ood": {
                "max_drift": None if drift is None else round(drift, 6),
                "max_drift_allowed": self.ood_max_drift_allowed,
                "verdicts_differing": self.ood_verdicts_differing,
                "decision_margin": self.ood_decision_margin,
            }
        }

    def _heat_summary(self) -> dict[str, Any]:
        if not self.heat_checked:
            return {}
        diff, drift = self.heat_max_diff, self.heat_max_drift
        return {
            "heatmap": {
                "max_diff": None if diff is None else round(diff, 6),
                "max_diff_allowed": self.heat_max_diff_allowed,
                "max_drift": None if drift is None else round(drift, 6),
                "max_drift_allowed": self.heat_max_drift_allowed,
            }
        }

    def explain(self) -> str:
        """One sentence for the log, the status topic and the refusal."""
        worst = self.worst
        features = ", ".join(self.cpu.get("int8_features", [])) or "none"
        verdict = "passed" if self.passed else "FAILED"
        heat = ""
        if self.heat_checked:
            heat = (
                f"; heat-map: max difference from FP32 as drawn {self.heat_max_diff or 0.0:.4f} "
                f"(allowed {self.heat_max_diff_allowed}), max drift "
                f"{self.heat_max_drift or 0.0:.2e} (allowed {self.heat_max_drift_allowed})"
            )
        if self.ood_checked:
            heat += (
                f"; out-of-distribution score: max drift from the build machine "
                f"{self.ood_max_drift or 0.0:.4f} (allowed {self.ood_max_drift_allowed}), "
                f"{self.ood_verdicts_differing} within/outside verdict(s) differ"
            )
        return (
            f"conformance check {verdict} for model {self.model} {self.version} on backend "
            f"{self.backend} ({self.quantization}) on this CPU ({self.cpu.get('model')}; INT8 features: "
            f"{features}): {len(self.rows)} reference images, max drift from the build machine "
            f"{self.max_drift:.4f} (allowed {self.max_drift_allowed:.4f}), max |p - p_fp32| "
            f"{self.max_abs_diff:.4f} (allowed {self.max_abs_diff_allowed:.4f}), "
            f"{self.decisions_differing} decision(s) differ; worst {worst.source}: built "
            f"{worst.expected:.4f}, FP32 {worst.reference:.4f}, here {worst.output:.4f}{heat}"
        )

    def table(self) -> str:
        """A fixed-width table, one line per reference image, for ``edge-runtime model verify``."""
        heat = self.heat_checked
        lines = [
            f"{'#':>3s} {'image':30s} {'label':>5s} {'p_fp32':>8s} {'p_built':>8s} {'p_here':>8s} "
            f"{'drift':>8s} {'|dp32|':>7s} {'decision':>8s} {'':4s}"
            + (f" {'heat_drift':>10s} {'heat_dfp32':>10s}" if heat else "")
        ]
        for row in self.rows:
            decision = "same" if row.decision_matches else ("margin" if row.near_threshold else "DIFF")
            heat_cells = ""
            if heat:
                heat_cells = "".join(
                    f" {value:10.3e}" if value is not None else f" {'-':>10s}"
                    for value in (row.heat_drift, row.heat_diff)
                )
            lines.append(
                f"{row.index:3d} {row.source[:30]:30s} {row.label:5d} {row.reference:8.5f} "
                f"{row.expected:8.5f} {row.output:8.5f} {row.drift:8.5f} {row.abs_diff:7.4f} "
                f"{decision:>8s} {'ok' if row.ok else 'FAIL':4s}{heat_cells}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "rows": [asdict(row) for row in self.rows],
            "cpu": self.cpu,
            "threshold": self.threshold,
            "decision_margin": self.decision_margin,
            "quantization": self.quantization,
        }


def require_cpu_support(artifact: ModelArtifact) -> None:
    """Refuse a model file whose bundle says it can only be trusted on other CPUs.

    A recipe whose integer arithmetic saturates on AVX2-only CPUs (``s8s8``)
    is packaged with ``requires_int8_dot: ["vnni", "arm-dot"]``; such a model
    is not even loaded where the CPU sums u8 x s8 products with VPMADDUBSW.
    """
    if not artifact.requires_int8_dot:
        return
    cpu = cpu_summary()
    if cpu["int8_dot"] not in artifact.requires_int8_dot:
        features = ", ".join(cpu["int8_features"]) or "none"
        raise ConformanceError(
            f"Model file {artifact.file} ({artifact.quantization}) is only validated on CPUs whose INT8 "
            f"dot products are {' or '.join(artifact.requires_int8_dot)}; this CPU ({cpu['model']}; INT8 "
            f"features: {features}) uses {cpu['int8_dot']}, where its results would differ."
        )


def reference_inputs(bundle: ModelBundle) -> dict[str, np.ndarray] | None:
    """The bundle's reference set, or None when it has none.

    Arrays: ``images``, ``labels``, ``reference`` (FP32), ``sources`` and,
    per backend measured where the bundle was built, ``expected_<backend>`` (and, where the
    model has them, ``cam_expected_<backend>`` and ``features_expected_<backend>``).

    Raises:
        ModelBundleError: the manifest names a reference set that cannot be read.
    """
    section = bundle.manifest.conformance
    if section is None:
        return None
    path = bundle.path / section.file
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("images", "labels", "reference", "sources")}
            arrays.update(
                {key: data[key] for key in data.files if key.startswith(("expected_", "cam_", "features_"))}
            )
    except (OSError, KeyError, ValueError) as exc:
        raise ModelBundleError(
            f"Model bundle {bundle.path}: conformance set {path.name} is unreadable: {exc}."
        ) from exc
    n = len(arrays["images"])
    if n == 0 or any(len(a) != n for a in arrays.values()):
        raise ModelBundleError(f"Model bundle {bundle.path}: conformance set {path.name} is inconsistent.")
    return arrays


def _as_unit_grey(image: np.ndarray) -> np.ndarray:
    """A stored reference image as the decoder would hand it over: float32 in [0, 1]."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    return image.astype(np.float32)


def check_conformance(
    bundle: ModelBundle, backend: Backend, threshold: float | None = None
) -> ConformanceReport | None:
    """Run the bundle's reference set on ``backend`` (already loaded) on this CPU.

    Returns None for a bundle without a reference set (built before 0.2.0).
    Never raises for a failed comparison: the caller decides (see
    :func:`enforce`); raises :class:`ModelBundleError` only for an unreadable set.
    """
    refs = reference_inputs(bundle)
    if refs is None:
        return None
    section = bundle.manifest.conformance
    assert section is not None  # reference_inputs returned a set
    allowed = section.max_abs_diff
    margin = section.decision_margin
    built = refs.get(f"expected_{backend.name}")
    # Without the build machine's output for this backend, drift is measured against FP32 and
    # bounded by the FP32 tolerance.
    drift_allowed = allowed if built is None or section.max_drift is None else section.max_drift
    cut = bundle.threshold if threshold is None else threshold
    labels = bundle.labels
    positive = positive_index(labels, bundle.positive_label)
    spec = bundle.preprocessing
    cam_reference = refs.get("cam_reference")
    cam_built = refs.get(f"cam_expected_{backend.name}")
    heat_allowed = section.heatmap_max_abs_diff if cam_reference is not None else None
    heat_drift_allowed = section.heatmap_max_drift if cam_built is not None else heat_allowed
    ood = _ood_check(bundle, refs, backend.name)
    batch = np.empty((1, *spec.sample_shape), dtype=np.float32)
    rows = []
    t0 = time.perf_counter()
    for i, image in enumerate(refs["images"]):
        preprocess(_as_unit_grey(image), spec, out=batch[0])
        out = backend.infer_outputs(batch)
        p = float(scores_to_probabilities(out.scores[0], bundle.output_activation)[positive])
        ref = float(refs["reference"][i])
        expected = float(built[i]) if built is not None else ref
        diff, drift = abs(p - ref), abs(p - expected)
        near = abs(expected - cut) <= margin
        same = (p >= cut) == (expected >= cut)
        heat_diff = heat_drift = None
        heat_ok = True
        if out.heatmap is not None and cam_reference is not None:
            heat_diff = heat_difference(out.heatmap[0], cam_reference[i], positive)
            heat_drift = heat_difference(
                out.heatmap[0], cam_built[i] if cam_built is not None else cam_reference[i], positive
            )
            heat_ok = (heat_allowed is None or heat_diff <= heat_allowed) and (
                heat_drift_allowed is None or heat_drift <= heat_drift_allowed
            )
        ood_score = ood_expected = None
        ood_ok = True
        if ood is not None:
            if out.features is None:
                raise ModelBundleError(
                    f"Model bundle {bundle.path}: backend {backend.name} was loaded without the "
                    "features output its out-of-distribution check reads."
                )
            ood_score = float(ood.model.score(out.features[:1])[0])
            ood_expected = float(ood.expected[i])
            ood_near = abs(ood_expected - ood.threshold) <= ood.margin
            ood_same = (ood_score > ood.threshold) == (ood_expected > ood.threshold)
            ood_ok = abs(ood_score - ood_expected) <= ood.max_drift and (ood_same or ood_near)
        rows.append(
            ConformanceRow(
                index=i,
                source=str(refs["sources"][i]),
                label=int(refs["labels"][i]),
                reference=ref,
                expected=expected,
                output=p,
                abs_diff=diff,
                drift=drift,
                near_threshold=near,
                decision_matches=same,
                ok=diff <= allowed and drift <= drift_allowed and (same or near) and heat_ok and ood_ok,
                heat_diff=heat_diff,
                heat_drift=heat_drift,
                ood_score=ood_score,
                ood_expected=ood_expected,
            )
        )
    heat_checked = any(row.heat_diff is not None for row in rows)
    artifact = bundle.artifact(backend.name)
    return ConformanceReport(
        model=bundle.name,
        version=bundle.version,
        backend=backend.name,
        quantization=artifact.quantization,
        cpu=cpu_summary(),
        threshold=cut,
        max_abs_diff_allowed=allowed,
        max_drift_allowed=drift_allowed,
        decision_margin=margin,
        rows=tuple(rows),
        seconds=time.perf_counter() - t0,
        heat_max_diff_allowed=heat_allowed if heat_checked else None,
        heat_max_drift_allowed=heat_drift_allowed if heat_checked else None,
        ood_max_drift_allowed=ood.max_drift if ood is not None else None,
        ood_decision_margin=ood.margin if ood is not None else None,
        ood_threshold=ood.threshold if ood is not None else None,
    )


@dataclass(frozen=True)
class _OodCheck:
    model: OodModel
    #: The build machine's score of each reference image (from its stored features).
    expected: np.ndarray
    threshold: float
    max_drift: float
    margin: float


def ood_for_backend(bundle: ModelBundle, backend_name: str) -> tuple[OodModel, float] | None:
    """The out-of-distribution statistics and threshold that apply to ``backend_name``'s features.

    Each backend quantizes the network with its own scales, so its pooled features are not the
    other's: statistics fitted on ONNX Runtime's features put LiteRT's validation images all
    outside. ``intended_use.ood`` names the statistics of the ONNX Runtime file (``file``,
    ``threshold``); where another backend has its own, they are under
    ``intended_use.ood.by_backend.<backend>`` (``file``, ``threshold``), fitted the same way on
    that backend's features. None: the bundle has no check, or this backend's file no features.

    Raises:
        ModelBundleError: the statistics cannot be read or do not fit the features output.
    """
    spec = bundle.manifest.intended_use.ood
    features = bundle.manifest.output.features
    if spec is None or features is None or bundle.manifest.features_output(backend_name) is None:
        return None
    fit = spec.for_backend(backend_name)
    return load_ood(bundle.path / fit.file, features.dims), float(fit.threshold)


def _ood_check(bundle: ModelBundle, refs: dict[str, np.ndarray], backend_name: str) -> _OodCheck | None:
    """What the out-of-distribution part of the check needs, or None where it does not apply.

    It applies when the bundle has the check (``intended_use.ood``), this backend's file computes
    the features, and the set holds the build machine's features for it; the tolerances are the
    conformance section's ``ood_max_drift`` and ``ood_decision_margin``.
    """
    stored = refs.get(f"features_expected_{backend_name}")
    section = bundle.manifest.conformance
    if stored is None or section is None:
        return None
    found = ood_for_backend(bundle, backend_name)
    if found is None:
        return None
    model, threshold = found
    max_drift = getattr(section, "ood_max_drift", None)
    margin = getattr(section, "ood_decision_margin", None)
    if not isinstance(max_drift, (int, float)) or not isinstance(margin, (int, float)):
        raise ModelBundleError(
            f"Model bundle {bundle.path}: the conformance set holds reference features but the "
            "manifest's conformance section gives no numeric ood_max_drift / ood_decision_margin.",
            action="Repackage the bundle with the training pipeline's package stage.",
        )
    if stored.ndim != 2 or stored.shape[1] != model.width:
        raise ModelBundleError(
            f"Model bundle {bundle.path}: reference features for {backend_name} have shape "
            f"{list(stored.shape)}; the features output is [images, {model.width}].",
            action="Repackage the bundle so the reference set and the model come from the same build.",
        )
    expected = model.score(stored)
    return _OodCheck(model, expected, threshold, float(max_drift), float(margin))


def open_engine(bundle: ModelBundle, backend_name: str, *, threads: int = 1) -> Backend:
    """The bundle's model for ``backend_name``, loaded on this CPU: the one way a model is opened.

    The CPU check first (a model file built for instructions this CPU lacks is refused before
    any engine starts), then the engine is created and loads the file; an engine whose load
    fails is closed again. The service, ``model verify``, packaging and the ``auto`` choice
    all open models here.

    Raises:
        ConformanceError: the model file needs CPU features this machine lacks.
        BackendError: the engine is unknown or cannot be imported.
        ModelBundleError: the engine refuses the model file.
    """
    require_cpu_support(bundle.artifact(backend_name))
    backend = create_backend(backend_name, threads=threads)
    try:
        backend.load(bundle)
    except BaseException:
        backend.close()
        raise
    return backend


def open_checked(
    bundle: ModelBundle, backend_name: str, *, threads: int = 1, threshold: float | None = None
) -> tuple[Backend, ConformanceReport | None]:
    """:func:`open_engine` and the bundle's conformance check on it (closed again if the check raises).

    The report is returned, passed or not: what a failure means is the caller's (the service
    refuses the model, ``model verify`` prints the table).
    """
    backend = open_engine(bundle, backend_name, threads=threads)
    try:
        return backend, check_conformance(bundle, backend, threshold)
    except BaseException:
        backend.close()
        raise


def verify_backend(
    bundle: ModelBundle, backend_name: str, *, threads: int = 1, threshold: float | None = None
) -> ConformanceReport | None:
    """Open the bundle's model for ``backend_name`` on this CPU, run the check, release the engine.

    For ``edge-runtime model verify`` and packaging, which want the report, not
    a loaded model (the service keeps its backend: :meth:`ScanAnalyzer.from_bundle_path`).
    """
    backend, report = open_checked(bundle, backend_name, threads=threads, threshold=threshold)
    backend.close()
    return report


def enforce(report: ConformanceReport) -> None:
    """Refuse a model whose report failed, the way a hash mismatch is refused."""
    if not report.passed:
        raise ConformanceError(report.explain() + ".")
