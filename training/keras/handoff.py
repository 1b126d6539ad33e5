"""What the Keras route hands to the shared stages (MAIN environment): the run files they read.

From ``quantize`` on, a run is a run: ``quantize``, ``ood``, ``evaluate`` and ``package`` read
``train_summary.json``, ``model.fp32.onnx``, ``calibration.json``, ``val_predictions.npz`` and
``export_summary.json``, whichever framework trained the model. The PyTorch route's ``train`` and
``export`` stages write them from ``checkpoint.pt``; for a Keras run this module writes them from
what ``.venv-keras`` produced (``keras_train_summary.json``, ``model.fp32.onnx`` converted by
tf2onnx as ``model.fp32.raw.onnx``, ``keras_tflite_val.npz``), with the same meaning:

* ``train_summary.json`` (:func:`write_train_summary`, after ``train --framework keras``): the
  shared schema, ``"framework": "keras"``, the options as the main environment parsed them, the
  split's images, patients and classes, and the Keras summary's epochs, seconds and versions.
* ``model.fp32.onnx``, finished from the raw graph by the PyTorch export's own last step
  (``finish_fp32_graph``), and ``calibration.json``, ``val_predictions.npz`` and
  ``export_summary.json`` (:func:`write_export_files`, after ``export --framework keras``): the
  temperature ``.venv-keras`` fitted on validation and folded into ``fc`` (the log-loss and ECE
  before and after, as the PyTorch route's export records them), the validation P(positive) of
  the Keras FP32 model (``keras``) and of ``model.fp32.onnx`` through the edge's ONNX Runtime
  backend (``fp32``), and the ONNX file's outputs checked against Keras on every validation image.

The rest of the route is the PyTorch route's code, unchanged: see training/README.md, "The Keras
route".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..data.datasets import items_from_split, read_split, run_spec
from ..data.images import CXRDataset, label_counts
from ..evaluate.metrics import calibration_effect, compare_predictions
from ..evaluate.scoring import file_scorer, run_head
from ..run_files import (
    CALIBRATION_NAME,
    EXPORT_SUMMARY,
    FP32_NAME,
    FP32_RAW_NAME,
    KERAS_SUMMARY_NAME,
    KERAS_TFLITE_SUMMARY,
    KERAS_TFLITE_VAL,
    SUMMARY_NAME,
    VAL_PREDICTIONS,
)

__all__ = ["FRAMEWORK", "write_export_files", "write_train_summary"]

FRAMEWORK = "keras"
#: Largest |ONNX - Keras| accepted on any output of any validation image: both are FP32 graphs of
#: the same weights, differing only in the order of float additions (measured: below 1e-5).
MAX_ONNX_DIFF = 1e-3


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the Keras route's earlier stage first.")
    return json.loads(path.read_text(encoding="utf-8"))


def write_train_summary(run: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """``train_summary.json`` in the shared schema from ``keras_train_summary.json`` and ``config``.

    ``config`` is the training options as the main environment parsed them (the keys of
    :class:`training.model.train.TrainConfig` that apply, plus ``framework``).
    """
    run = Path(run)
    keras_summary = _read(run / KERAS_SUMMARY_NAME)
    dataset = items_from_split(read_split(run))
    stage2 = keras_summary["stage2"]
    epochs = int(config["epochs"])

    def counts(items: Any) -> dict[str, Any]:
        items = list(items)
        return {
            "images": len(items),
            "patients": len({i.patient for i in items}),
            **label_counts(items, dataset.classes),
        }

    env = keras_summary["environment"]
    summary = {
        "framework": FRAMEWORK,
        "config": {**config, "framework": FRAMEWORK, "spec": run_spec(run).to_dict()},
        "model": keras_summary["model"],
        "cut": keras_summary["cut"],
        "trainable_blocks": f"blocks {keras_summary['cut']}-15 of 16 + head conv + classifier",
        "data": {
            "root": str(dataset.root),
            "train": counts(dataset.train),
            "val": counts(dataset.val),
            "augmented_views_per_train_image": int(config["aug_views"]),
        },
        "stage1": {
            "val_auc": keras_summary["stage1"]["val_auc"],
            "history": keras_summary["stage1"]["history"],
        },
        "stage2": {
            # No timing probe in the Keras route: the plan is --epochs; the budget can only stop it early.
            "epochs_planned": epochs,
            "epochs_final_plan": epochs,
            "epochs_run": stage2["epochs_run"],
            "best_epoch": stage2["best_epoch"],
            "seconds_per_epoch": stage2["seconds_per_epoch"],
            "history": stage2["history"],
        },
        "val_auc": keras_summary["calibration"]["val_auc"]["after"],
        "seconds": keras_summary["seconds"],
        "environment": {
            "framework": f"tensorflow-cpu {env['tensorflow-cpu']}, keras {env['keras']}",
            "threads": env["threads"],
            "cpu_count": env["cpu_count"],
            "machine": env["machine"],
        },
        "keras_summary": KERAS_SUMMARY_NAME,
    }
    (run / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def write_export_files(run: str | Path, threads: int = 2) -> dict[str, Any]:
    """``calibration.json``, ``val_predictions.npz`` and ``export_summary.json`` of a Keras run.

    Raises:
        RuntimeError: ``model.fp32.onnx`` does not compute the Keras model's outputs.
    """
    from ..export.onnx_export import finish_fp32_graph, heatmap_output  # torch: main environment only

    t_start = time.monotonic()
    run = Path(run)
    keras_summary = _read(run / KERAS_SUMMARY_NAME)
    export = _read(run / KERAS_TFLITE_SUMMARY)
    split = read_split(run)
    spec = run_spec(run)
    head = run_head(split)
    dataset = items_from_split(split)
    val_data = CXRDataset(list(dataset.val), spec)
    y = val_data.labels
    val_x = np.stack([val_data.sample(i) for i in range(len(val_data))])
    with np.load(run / KERAS_TFLITE_VAL, allow_pickle=False) as saved:
        keras_out = {k: saved[k] for k in ("val_labels", "fp32_probabilities", "fp32_cam", "fp32_features")}
    if not np.array_equal(keras_out["val_labels"], y):
        raise ValueError(f"{run / KERAS_TFLITE_VAL} is not of this run's validation split; export again")
    positive = head.labels.index(head.positive_label)
    p_keras = keras_out["fp32_probabilities"][:, positive].astype(np.float64)

    raw = run / FP32_RAW_NAME
    if not raw.is_file():
        raise FileNotFoundError(f"{raw} is missing: run 'python -m training export --framework keras' first.")
    finish_fp32_graph(raw, run / FP32_NAME)
    # The converter's check: every output of the ONNX graph against Keras, on every validation image.
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(run / FP32_NAME), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    onnx_out = {name: [] for name in names}  # type: dict[str, list[np.ndarray]]
    for start in range(0, len(val_x), 32):
        for name, value in zip(names, session.run(names, {"input": val_x[start : start + 32]}), strict=True):
            onnx_out[name].append(value)
    joined = {name: np.concatenate(parts) for name, parts in onnx_out.items()}
    onnx_vs_keras = {
        "probabilities": _max_abs(joined["probabilities"], keras_out["fp32_probabilities"]),
        "cam": _max_abs(joined["cam"], keras_out["fp32_cam"].transpose(0, 3, 1, 2)),
        "features": _max_abs(joined["features"], keras_out["fp32_features"]),
    }
    worst = max(onnx_vs_keras, key=lambda k: onnx_vs_keras[k])
    if onnx_vs_keras[worst] > MAX_ONNX_DIFF:
        raise RuntimeError(
            f"{run / FP32_NAME} does not compute the Keras model: its {worst} output differs by "
            f"{onnx_vs_keras[worst]:.3g} on validation (limit {MAX_ONNX_DIFF}); re-run the export"
        )
    with file_scorer(run / FP32_NAME, spec, head, threads) as scorer:  # the edge's backend
        p_fp32 = scorer(val_x)
    np.savez(run / VAL_PREDICTIONS, y=y, **{FRAMEWORK: p_keras}, fp32=p_fp32)

    calibration = keras_summary["calibration"]
    temperature = float(calibration["temperature"])
    clipped = np.clip(p_keras, 1e-12, 1 - 1e-12)
    before = 1.0 / (1.0 + np.exp(-temperature * np.log(clipped / (1.0 - clipped))))  # margin x T
    record = {
        "temperature": temperature,
        "method": calibration["method"],
        "framework": FRAMEWORK,
        "validation": calibration_effect(y, before, p_keras),
    }
    (run / CALIBRATION_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    onnx_info = export["fp32_onnx"]
    features = export["output"]["features"]
    summary = {
        "framework": FRAMEWORK,
        "opset": onnx_info["opset"],
        "converter": onnx_info["converter"],
        "checkpoint_cut": keras_summary["cut"],
        "temperature": temperature,
        "sizes_bytes": {"fp32": (run / FP32_NAME).stat().st_size},
        "heatmap": heatmap_output(run / FP32_NAME),
        "features": {"name": features["name"], "layers": features["layers"], "dims": features["dims"]},
        "val_n": int(y.size),
        "fp32_vs_keras": compare_predictions(p_keras, p_fp32, 0.5),
        "fp32_onnx_vs_keras_max_abs": onnx_vs_keras,
        "seconds": {"export": time.monotonic() - t_start + float(export["seconds"]["total"])},
    }
    (run / EXPORT_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"export: {FP32_NAME} ({summary['sizes_bytes']['fp32'] / 1e6:.2f} MB, tf2onnx) vs Keras FP32 on "
        f"{y.size} validation images: max |d| probabilities {onnx_vs_keras['probabilities']:.2g}, cam "
        f"{onnx_vs_keras['cam']:.2g}, features {onnx_vs_keras['features']:.2g}; temperature "
        f"{temperature:.3f} (fitted in .venv-keras)",
        flush=True,
    )
    return summary
