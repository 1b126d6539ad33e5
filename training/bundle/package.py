"""Write the model bundle: ``model.int8.onnx``, ``MODEL_CARD.md``, ``manifest.json``.

The manifest is the contract the edge reads (labels, input, preprocessing,
threshold, file hashes); the model card is for the people who decide
whether to deploy it. Both are generated from the run folder's summaries so
the numbers in them are the numbers the pipeline measured, not retyped.
What the model is (family, pretraining, input size) and what it was trained
on (dataset, class names, intended population) come from the run too: its
``train_summary.json`` and ``split.json`` (see :mod:`training.data.datasets`);
the Kermany/EfficientNet-Lite0 text of the default bundle is one case of it.
The bundle is re-read with :func:`edge_runtime.bundle.load_bundle` at the
end, so a bundle the edge would refuse is never left behind silently.
With a signing key the final manifest is signed (``manifest.sig.json``,
:mod:`edge_runtime.signing`); without one the bundle loads only where
``Model.RequireSignature`` is false.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle import MANIFEST_NAME, BundleTrust, load_bundle, write_manifest
from edge_runtime.conformance import verify_backend
from edge_runtime.results import positive_index
from edge_runtime.signing import SIGNATURE_NAME, load_private_key, sign_manifest

from ..data.datasets import SPLIT_FILE, read_split, run_spec
from ..evaluate.metrics import compare_predictions
from ..evaluate.ood import OOD_NAME, OOD_VALIDATION, fit_backend_ood
from ..run_files import (
    EVALUATION_NAME,
    EXPORT_SUMMARY,
    INT8_NAME,
    KERAS_TFLITE_NAME,
    KERAS_TFLITE_SUMMARY,
    KERAS_TFLITE_VAL,
    SUMMARY_NAME,
    TEST_PREDICTIONS,
    TFLITE_EXPORT_SUMMARY,
    TFLITE_NAME,
)
from .card_sections import TARGETS, conformance_text, files_section, targets_section
from .conformance_set import (
    CONFORMANCE_NAME,
    build_reference_set,
    conformance_section,
    heat_build_diffs,
    heat_tolerances,
    measure_backends,
    measure_outputs,
    ood_tolerances,
)
from .manifest import (
    DataCard,
    build_manifest,
    calibration_section,
    data_card,
    monitoring_section,
    ood_section,
)
from .model_card import MODEL_CARD_NAME, render_model_card
from .model_id import stamp_onnx_model_id

__all__ = [
    "BUNDLE_FILES",
    "MODEL_CARD_NAME",
    "TARGETS",
    "TEST_PREDICTIONS_NAME",
    "DataCard",
    "build_manifest",
    "data_card",
    "package_bundle",
    "render_model_card",
]

TEST_PREDICTIONS_NAME = TEST_PREDICTIONS
BUNDLE_FILES = (
    INT8_NAME,
    TFLITE_NAME,
    MODEL_CARD_NAME,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    CONFORMANCE_NAME,
    OOD_NAME,
    "ood.litert.npz",
)


def _litert_file(run: Path, threshold: float, positive: int) -> tuple[Path, dict[str, Any]] | None:
    """The run's INT8 LiteRT file, if any, and what the card and manifest say about it.

    The PyTorch route's comes from ``training/tflite_env.sh`` (``model.int8.tflite``), the Keras
    route's from TensorFlow's converter (``model.int8.keras.tflite``); both ship as
    ``model.int8.tflite``. ``agreement``: its decisions at the operating point against the
    framework's own FP32 model on validation.
    """
    if (run / TFLITE_NAME).is_file():
        summary = _read(run, TFLITE_EXPORT_SUMMARY)
        return run / TFLITE_NAME, {
            "quantization": summary["quantization"],
            "heatmap": bool(summary.get("heatmap")),
            "features": bool(summary.get("features")),
            "calibration_images": summary["calibration_images"],
            "validation_images": summary["validation_images"],
            "agreement": summary["int8_vs_torch"],
            "reference": "PyTorch",
            "tool": f"ai-edge-quantizer `{summary['quantization']}`",
            "how": "`training/tflite_env.sh` (its own virtual environment: litert-torch and "
            "ai-edge-quantizer pin versions that conflict with the main one)",
        }
    if (run / KERAS_TFLITE_NAME).is_file():
        summary = _read(run, KERAS_TFLITE_SUMMARY)
        with np.load(run / KERAS_TFLITE_VAL) as saved:
            p_keras = saved["fp32_probabilities"][:, positive]
            p_int8 = saved["int8_probabilities"][:, positive]
        outputs = summary["output"]
        return run / KERAS_TFLITE_NAME, {
            "quantization": summary["quantization"],
            "heatmap": bool(outputs.get("heatmap")),
            "features": bool(outputs.get("features")),
            "calibration_images": summary["calibration_images"],
            "validation_images": summary["validation_images"],
            "agreement": compare_predictions(p_keras, p_int8, threshold),
            "reference": "the Keras FP32 model",
            "tool": f"TensorFlow's converter, `{summary['quantization']}`",
            "how": "`python -m training export --framework keras` (TensorFlow in `.venv-keras`)",
        }
    return None


def _read(run: Path, name: str) -> dict[str, Any]:
    path = run / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the earlier pipeline stages first.")
    return json.loads(path.read_text(encoding="utf-8"))


def package_bundle(
    run_dir: str | Path,
    bundle_dir: str | Path,
    version: str = "0.1.0",
    signing_key: str | Path | None = None,
) -> Path:
    """Assemble the bundle folder from a finished run and verify it with the edge loader.

    Only the bundle's own files are replaced; any other file in the folder
    would be hashed into the manifest and shipped, so it is refused instead.
    ``signing_key`` (a P-256 PEM private key, ``python -m training keygen``)
    signs the final manifest; the bundle is then verified against that key's
    public half, exactly as a box that trusts it would.
    """
    run = Path(run_dir)
    bundle = Path(bundle_dir)
    private_key = load_private_key(signing_key) if signing_key is not None else None  # fail early
    # The packager's own files: believed if signed by its key; unsigned only for development.
    if private_key is not None:
        trust = BundleTrust.from_public_keys([private_key.public_key()])
    else:
        trust = BundleTrust(require_signature=False)
    train_summary = _read(run, SUMMARY_NAME)
    export_summary = _read(run, EXPORT_SUMMARY)
    evaluation = _read(run, EVALUATION_NAME)
    split = read_split(run) if (run / SPLIT_FILE).is_file() else None
    spec = run_spec(run)

    bundle.mkdir(parents=True, exist_ok=True)
    strangers = sorted(p.name for p in bundle.iterdir() if p.name not in BUNDLE_FILES)
    if strangers:
        raise FileExistsError(
            f"{bundle} holds files that are not part of the bundle: {', '.join(strangers)}. "
            "Remove them (every file in the folder is hashed into the manifest)."
        )
    for name in BUNDLE_FILES:
        (bundle / name).unlink(missing_ok=True)
    shutil.copyfile(run / INT8_NAME, bundle / INT8_NAME)
    manifest = build_manifest(train_summary, export_summary, evaluation, spec, version, split)
    # The ONNX file and its manifest entry carry the same id: a model file from another build
    # is refused at load even if someone rewrites its hash in the manifest.
    manifest["artifacts"][0]["model_id"] = stamp_onnx_model_id(bundle / INT8_NAME)
    calibration = calibration_section(run)
    if calibration:
        manifest["calibration"] = calibration
    litert = _litert_file(
        run,
        float(evaluation["threshold"]),
        positive_index(manifest["labels"], manifest["positive_label"]),
    )
    tflite = None
    if litert is not None:
        source, tflite = litert
        shutil.copyfile(source, bundle / TFLITE_NAME)
        entry = {"file": TFLITE_NAME, "backend": "litert", "quantization": tflite["quantization"]}
        if tflite.get("heatmap") and manifest["output"].get("heatmap"):
            entry["heatmap"] = True
        if tflite.get("features") and manifest["output"].get("features"):
            entry["features"] = True
        manifest["artifacts"].append(entry)
    # The out-of-distribution check (ood stage): its statistics ship; the manifest says how to
    # read them and the drift monitor gets the validation split as its reference.
    ood = ood_section(run)
    if ood is not None:
        shutil.copyfile(run / OOD_NAME, bundle / OOD_NAME)
        manifest["intended_use"]["ood"] = ood
        outside = run / "ood_outside.json"  # optional: images outside the intended use, measured
        if outside.is_file():
            manifest["intended_use"]["ood"]["measured_outside"] = {
                "note": "share flagged outside per backend; adult NIH ChestX-ray14 films, the official "
                "test split rotated 90 degrees, inverted or flipped left-right, non-chest DICOM images",
                **json.loads(outside.read_text(encoding="utf-8")),
            }
    monitoring = monitoring_section(run, float(manifest["operating_point"]["threshold"]))
    if monitoring is not None:
        manifest["monitoring"] = monitoring
    # The reference set, then each backend measured on it here through the edge's own check;
    # their outputs are stored beside the FP32 references so every box can be held to them.
    refs = build_reference_set(run, spec)
    np.savez_compressed(bundle / CONFORMANCE_NAME, **refs)
    manifest["conformance"] = {
        "file": CONFORMANCE_NAME,
        "max_abs_diff": 1.0,  # provisional, while the backends are measured
        "decision_margin": 1.0,
    }
    write_manifest(bundle, manifest)
    if private_key is not None:
        sign_manifest(bundle, private_key)
    provisional = load_bundle(bundle, trust=trust)
    outputs = measure_backends(provisional)
    maps, features = measure_outputs(
        provisional, refs, heatmaps="cam_reference" in refs, features=ood is not None
    )
    np.savez_compressed(
        bundle / CONFORMANCE_NAME,
        **refs,
        **{f"expected_{name}": p for name, p in outputs.items()},
        **{f"cam_expected_{name}": m for name, m in maps.items()},
        **{f"features_expected_{name}": f for name, f in features.items()},
    )
    card_data = data_card(split)
    credit = (
        f"{len(refs['images'])} images of the training split "
        f"(e.g. {', '.join(map(str, refs['sources'][:3]))}; "
        f"all listed in the file's `sources`), {card_data.title}; {card_data.license}. "
        f"{card_data.citation}"
    )
    manifest["conformance"] = conformance_section(refs, outputs, credit)
    if features:
        with np.load(run / OOD_VALIDATION) as saved:
            manifest["conformance"].update(ood_tolerances(saved["scores"]))
        manifest["conformance"]["ood_rule"] = (
            "per backend, the out-of-distribution score of each reference image from this box's "
            "features within ood_max_drift of the score of the build machine's features "
            "(features_expected_<backend>), and the same within/outside verdict except within "
            "ood_decision_margin of the threshold; tolerance = 5 % of the validation scores' "
            "interdecile range"
        )
        # Every backend but the one the ood stage fitted gets statistics of its own features
        # (edge_runtime.conformance.ood_for_backend reads them).
        by_backend = {}
        for name in features:
            if name != "onnxruntime":
                fitted = fit_backend_ood(run, provisional, name)
                fitted.pop("validation_scores")
                by_backend[name] = fitted
        if by_backend:
            manifest["intended_use"]["ood"]["by_backend"] = by_backend
    if maps:
        positive = positive_index(manifest["labels"], manifest["positive_label"])
        heat = heat_build_diffs(maps, refs, positive)
        manifest["conformance"].update(heat_tolerances({k: v["max"] for k, v in heat.items()}))
        manifest["conformance"]["build"]["heatmaps"] = heat
        manifest["conformance"]["build"]["heatmap_grid"] = list(refs["cam_reference"].shape[2:])
        manifest["conformance"]["heatmap_rule"] = (
            "positive-class map (its logit map minus the others' mean) scaled to [0, 1] as drawn "
            "(minus its minimum, divided by its range, at least 1 logit): max |difference| from "
            "the build machine's map of the same backend <= heatmap_max_drift; from the FP32 map "
            "<= 2 x the largest such difference of any shipped backend here + 0.05"
        )
    card = render_model_card(
        manifest, evaluation, split=split, config=train_summary["config"], bundle_dir=bundle_dir
    )
    extra = files_section(manifest, tflite)
    if data_card(split).key == "kermany":
        extra += targets_section(run, evaluation, (run / INT8_NAME).stat().st_size)
    extra += conformance_text(manifest["conformance"])
    card = card.replace("\n## Limitations", extra + "\n## Limitations", 1)
    (bundle / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
    path = write_manifest(bundle, manifest)
    if private_key is not None:
        sign_manifest(bundle, private_key)
    loaded = load_bundle(bundle, trust=trust)
    for name in loaded.backends:  # the finished bundle passes its own check here, as on a box
        report = verify_backend(loaded, name)
        if report is not None and not report.passed:
            raise RuntimeError(f"the packaged bundle fails its own conformance check: {report.explain()}")
    if loaded.signature.verified:
        signed = f"signed by key {loaded.signature.signer}"
    else:
        signed = (
            "UNSIGNED: it loads only where Model.RequireSignature is false; "
            "pass --signing-key KEY.pem to sign it"
        )
    print(f"bundle {loaded.name} {loaded.version} written to {bundle} ({path.name} verified, {signed})")
    return bundle
