"""The bundle's conformance reference set: a few training images with their FP32 answers.

Every box runs these images through its own backend when it loads the
bundle (:mod:`edge_runtime.conformance`) and refuses the model if it does
not reproduce the FP32 probabilities recorded here within the tolerance.

Which images: ``per_class`` images of each class from the run's *training*
split (never validation or test), picked from a seeded pool at evenly
spaced ranks of the FP32 probability within each class. So the set spans
confident and hard cases, including some close to the operating point,
where an arithmetic difference shows first. Each is stored as the 8-bit
grey image at the model's input size (what :func:`~edge_runtime.preprocess.preprocess`
builds before normalising), so the device rebuilds the exact input tensor
from it: about 0.5 MB for 32 images at 128 px.

Each shipped backend's output on the build machine is stored too
(``expected_<backend>``). A box must reproduce it within ``MAX_DRIFT``
(0.05): with a recipe whose integer arithmetic is the same on every CPU
(``u8s8-rr``) the difference is 0, while the saturation seen with ``s8s8``
on AVX2-only boxes moved outputs by up to 0.75. Against FP32 the tolerance
is ``2 x`` the largest ``|p_backend - p_fp32|`` any shipped backend shows
here, plus 0.01, at least 0.02. A build whose own backends differ from FP32
by more than ``MAX_BUILD_DIFF`` is refused: such a model is not fit to
ship.

Where the export has a heat-map output (``cam``), the set also holds the FP32
model's maps of the same images (``cam_reference``) and each shipped
backend's maps on the build machine (``cam_expected_<backend>``, only for
backends whose file computes one), and the manifest gets heat-map
tolerances (see :func:`heat_tolerances`).

Where the model has a features output and the run an out-of-distribution check, each shipped
backend's pooled features of the reference images on the build machine are stored
(``features_expected_<backend>``); a box scores its own features and the stored ones with the
bundle's statistics and must agree within ``ood_max_drift`` (see :func:`ood_tolerances`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends.onnx import OnnxRuntimeBackend
from edge_runtime.bundle import ModelBundle
from edge_runtime.conformance import open_engine, verify_backend
from edge_runtime.cpu import cpu_summary
from edge_runtime.heat import heat_difference
from edge_runtime.preprocess import PreprocessSpec, preprocess

from ..data.datasets import read_split
from ..data.images import CXRDataset
from ..evaluate.scoring import INPUT_NAME, file_scorer, run_head
from ..export.onnx_export import _stack, heatmap_output, load_split
from ..run_files import FP32_NAME

__all__ = [
    "CONFORMANCE_NAME",
    "HEAT_MAX_DRIFT",
    "MAX_BUILD_DIFF",
    "MAX_DRIFT",
    "build_reference_set",
    "conformance_section",
    "heat_build_diffs",
    "heat_tolerances",
    "measure_backends",
    "measure_outputs",
    "ood_tolerances",
    "tolerance_for",
]

CONFORMANCE_NAME = "conformance.npz"
#: Largest |p_backend - p_fp32| on the reference set that packaging accepts from a shipped backend.
#: The references span hard cases on purpose, where INT8 error is largest (0.2.0: 0.12 for ONNX
#: Runtime on one image; single validation images reach 0.4).
MAX_BUILD_DIFF = 0.25
#: Largest |p - p_build| a box may show against the same backend on the build machine. A recipe
#: without saturation reproduces the build machine bit for bit (0.0 measured on an emulated
#: AVX2-only CPU); 0.05 leaves room for float rounding in the float head and requantization of
#: other kernels (ARM, other XNNPACK paths) while catching the 0.5-0.75 moves of saturating kernels.
MAX_DRIFT = 0.05
#: Largest normalised heat-map difference (:func:`edge_runtime.conformance.heat_difference`) a box
#: may show against the same backend on the build machine: 5 % of the reference map's contrast.
#: The INT8 trunk computes the same integers on every CPU (``u8s8-rr``); the map's float 1x1
#: convolution differs by rounding only (measured on an emulated AVX2-only CPU: see the card).
HEAT_MAX_DRIFT = 0.05


def _grey_from_tensor(sample: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Invert the normalisation of one preprocessed sample back to the stored grey image."""
    plane = sample[0] if spec.layout == "NCHW" else sample[..., 0]
    grey = plane.astype(np.float64) * spec.std[0] + spec.mean[0]
    if spec.quantize_8bit:
        return np.rint(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)
    return grey.astype(np.float32)


def build_reference_set(
    run: Path, spec: PreprocessSpec, per_class: int = 16, pool: int = 400, seed: int = 2018
) -> dict[str, np.ndarray]:
    """Pick and encode the reference images; returns the arrays ``conformance.npz`` holds.

    ``reference`` is P(positive) of the run's (calibrated) FP32 ONNX model
    on the tensor rebuilt from the stored image, which is checked to be
    bit-identical to the tensor built from the original file.
    """
    _, train_items, _ = load_split(run)
    dataset = CXRDataset(train_items, spec)
    labels = dataset.labels
    rng = np.random.default_rng(seed)
    picks: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        share = max(per_class, round(pool * members.size / labels.size))
        picks.extend(rng.choice(members, size=min(share, members.size), replace=False).tolist())
    picks.sort()
    x = _stack(dataset, picks, "reference pool")
    scorer = file_scorer(run / FP32_NAME, spec, run_head(read_split(run)))
    p = scorer(x)
    chosen: list[int] = []
    for label in np.unique(labels):
        rows = [i for i, index in enumerate(picks) if labels[index] == label]
        rows.sort(key=lambda i: p[i])
        at = np.unique(np.linspace(0, len(rows) - 1, min(per_class, len(rows))).round().astype(int))
        chosen.extend(rows[i] for i in at)
    images = np.stack([_grey_from_tensor(x[i], spec) for i in chosen])
    rebuilt = np.stack([preprocess(img.astype(np.float32) / np.float32(255.0), spec) for img in images])
    if spec.quantize_8bit and not np.array_equal(rebuilt, x[chosen]):
        raise RuntimeError("a stored reference image does not rebuild its input tensor exactly")
    reference = scorer(rebuilt).astype(np.float32)
    scorer.close()
    refs = {
        "images": images,
        "labels": np.asarray([labels[picks[i]] for i in chosen], dtype=np.int8),
        "reference": reference,
        "sources": np.asarray([Path(train_items[picks[i]].path).name for i in chosen], dtype="<U64"),
    }
    heatmap = heatmap_output(run / FP32_NAME)
    if heatmap is not None:
        engine = OnnxRuntimeBackend(threads=2)
        engine.load_model(
            run / FP32_NAME,
            input_name=INPUT_NAME,
            sample_shape=spec.sample_shape,
            heatmap_name=heatmap["name"],
        )
        maps = [engine.infer_outputs(rebuilt[i : i + 1]).heatmap for i in range(len(rebuilt))]
        engine.close()
        refs["cam_reference"] = np.concatenate([m for m in maps if m is not None]).astype(np.float32)
    return refs


def tolerance_for(build_diff: float) -> float:
    """The manifest's ``max_abs_diff`` from the worst backend-vs-FP32 difference on the build machine."""
    return max(0.02, math.ceil((2.0 * build_diff + 0.01) * 100) / 100)


def heat_tolerances(heat_diffs: dict[str, float]) -> dict[str, float]:
    """The manifest's heat-map tolerances from each backend's worst difference from FP32 here."""
    worst = max(heat_diffs.values(), default=0.0)
    return {
        "heatmap_max_drift": HEAT_MAX_DRIFT,
        "heatmap_max_abs_diff": min(1.0, math.ceil((2.0 * worst + 0.05) * 100) / 100),
    }


#: The out-of-distribution score's allowed drift and verdict margin, as a share of the validation
#: scores' interdecile range (q90 - q10): the same INT8 integers give the same score on every
#: CPU (u8s8-rr; drift 0 measured), so this only leaves room for float rounding in the pooling.
OOD_DRIFT_SHARE = 0.05


def ood_tolerances(validation_scores: np.ndarray) -> dict[str, float]:
    """``ood_max_drift`` and ``ood_decision_margin`` from the validation OOD scores' spread."""
    q10, q90 = np.quantile(np.asarray(validation_scores, dtype=np.float64), [0.1, 0.9])
    tolerance = max(round(float(OOD_DRIFT_SHARE * (q90 - q10)), 4), 1e-4)
    return {"ood_max_drift": tolerance, "ood_decision_margin": tolerance}


def measure_outputs(
    bundle: ModelBundle, refs: dict[str, np.ndarray], *, heatmaps: bool = True, features: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each shipped backend's heat-maps and pooled features of the reference images, here.

    One engine run per image gives both (as on the device); a backend whose file lacks one of
    them is left out of that mapping.
    """
    maps: dict[str, np.ndarray] = {}
    pooled: dict[str, np.ndarray] = {}
    spec = bundle.preprocessing
    for name in bundle.backends:
        want_map = heatmaps and bundle.manifest.heatmap_output(name) is not None
        want_features = features and bundle.manifest.features_output(name) is not None
        if not (want_map or want_features):
            continue
        engine = open_engine(bundle, name, threads=2)
        batch = np.empty((1, *spec.sample_shape), dtype=np.float32)
        map_rows, feature_rows = [], []
        for image in refs["images"]:
            preprocess(image.astype(np.float32) / np.float32(255.0), spec, out=batch[0])
            out = engine.infer_outputs(batch)
            if want_map:
                assert out.heatmap is not None  # the manifest says this file has one
                map_rows.append(out.heatmap[0])
            if want_features:
                assert out.features is not None  # the manifest says this file has them
                feature_rows.append(out.features[0])
        engine.close()
        if want_map:
            maps[name] = np.stack(map_rows).astype(np.float32)
        if want_features:
            pooled[name] = np.stack(feature_rows).astype(np.float32)
    return maps, pooled


def heat_build_diffs(
    maps: dict[str, np.ndarray], refs: dict[str, np.ndarray], positive: int
) -> dict[str, dict[str, Any]]:
    """Per backend: max/mean normalised heat-map difference from FP32 on the build machine."""
    out: dict[str, dict[str, Any]] = {}
    for name, cams in maps.items():
        diffs = np.asarray(
            [
                heat_difference(cam, ref, positive)
                for cam, ref in zip(cams, refs["cam_reference"], strict=True)
            ]
        )
        out[name] = {
            "max": round(float(diffs.max()), 6),
            "mean": round(float(diffs.mean()), 6),
            "worst_image": str(refs["sources"][int(diffs.argmax())]),
        }
    return out


def measure_backends(bundle: ModelBundle) -> dict[str, np.ndarray]:
    """Each shipped backend's P(positive) on the reference set, here, through the edge's own check.

    Raises:
        RuntimeError: a backend differs from FP32 by more than :data:`MAX_BUILD_DIFF`.
    """
    outputs: dict[str, np.ndarray] = {}
    for name in bundle.backends:
        report = verify_backend(bundle, name)
        assert report is not None  # the caller wrote the section
        if report.max_abs_diff > MAX_BUILD_DIFF:
            raise RuntimeError(
                f"{name} differs from FP32 by {report.max_abs_diff:.3f} on reference image "
                f"{report.worst.source} (limit {MAX_BUILD_DIFF}): the quantized model is not fit to ship"
            )
        outputs[name] = np.asarray([row.output for row in report.rows], dtype=np.float32)
    return outputs


def conformance_section(
    refs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], credit: str
) -> dict[str, Any]:
    """The manifest's ``conformance`` section from the build machine's measurements."""
    build = {}
    worst = 0.0
    for name, p in outputs.items():
        diff = np.abs(p - refs["reference"])
        worst = max(worst, float(diff.max()))
        build[name] = {
            "max_abs_diff": round(float(diff.max()), 6),
            "mean_abs_diff": round(float(diff.mean()), 6),
            "worst_image": str(refs["sources"][int(diff.argmax())]),
        }
    return {
        "file": CONFORMANCE_NAME,
        "images": len(refs["images"]),
        "reference": "P(positive) of the calibrated FP32 ONNX model, and of each shipped backend "
        "(expected_<backend>) on the build machine",
        "max_drift": MAX_DRIFT,
        "decision_margin": MAX_DRIFT,
        "max_abs_diff": tolerance_for(worst),
        "build": {"cpu": cpu_summary(), "backends": build},
        "tolerance_rule": f"drift from the build machine's output of the same backend <= {MAX_DRIFT}; "
        "|p - p_fp32| <= 2 x the largest such difference of any shipped backend on the build machine "
        "+ 0.01 (at least 0.02); decisions as on the build machine except within "
        f"{MAX_DRIFT} of the threshold",
        "source": credit,
    }
