"""The Keras route's export (runs ONLY in ``.venv-keras``): ``model.keras`` -> INT8 ``.tflite`` + FP32 ONNX.

    training/keras_env.sh python -m training.keras.export_tflite --run runs/keras

Normally started by ``python -m training export --framework keras --out RUN`` (training/cli.py),
which then checks the file in the MAIN environment through the edge's own LiteRT backend
(:mod:`training.keras.check_litert`).

The file follows the PyTorch route's (``training/export/tflite_export.py``, litert-torch +
ai-edge-quantizer) conventions, so the edge's LiteRT backend runs both the same way:

* **Input**: ``[1, H, W, C]`` NHWC, INT8, scale and zero point from the preprocessing spec's exact
  range (:func:`input_range`, [-1, 1] -> scale 2/255, zero point -1 for the shipped spec). The
  runtime feeds the spec's NCHW float32 batch; ``edge_runtime/backends/litert.py`` transposes it
  (its input shape is the spec's NHWC) and quantizes it with the file's scale and zero point.
  TensorFlow's calibration puts the input's maximum at the brightest calibration pixel (0.92 in
  the 64 px test run), clipping brighter grey levels, so the range is set from the spec, as the
  PyTorch route does.
* **Outputs**, all float32, told apart by the backend by rank and width:
  ``probabilities`` ``[1, classes]`` (the model's own pooling, ``fc`` with the temperature folded
  in, softmax); ``cam`` ``[1, h, w, classes]`` (the class-activation map of
  ``training.model.models.ClassActivationModel``: ``fc`` as a 1x1 convolution on the last
  convolutional features, ``head_relu6``, so its spatial mean is the calibrated logits; the backend
  hands it on as ``[1, classes, h, w]``); ``features`` ``[1, 448]`` (global averages of the outputs
  of blocks 2, 4, 7, 10 and 14, the ends of the multi-block stages, concatenated: the PyTorch
  route's ``stage_taps`` layers ``_blocks.2`` ... ``_blocks.14``, widths 24, 40, 80, 112, 192).
* **Precision**: every convolution, depthwise convolution, addition and mean INT8 (per-channel
  INT8 weights, INT8 activations); the float head of the PyTorch route: ``FULLY_CONNECTED``,
  ``SOFTMAX``, the CAM's 1x1 ``CONV_2D`` and the features' ``CONCATENATION`` stay float32 (an INT8
  softmax cannot express a probability above 255/256; each pooled stage keeps its own scale).

How, with TensorFlow's converter (``tf.lite.TFLiteConverter``, ``TFLITE_BUILTINS_INT8``, a
representative dataset of TRAINING inputs from ``keras-inputs.npz``, never validation): the
converter's one-shot full-integer path quantizes the softmax and the outputs to INT8 and has no
per-op exception, so the export runs its two halves itself: calibration
(``_experimental_calibrate_only``), then the input's range is set in the calibrated flatbuffer,
then ``tensorflow.lite.python.convert.mlir_quantize`` (what the converter calls) with the head ops
and the CAM node denylisted, then ``modify_model_io_type`` makes the input INT8. The result's op
and dtype profile is the PyTorch route's (33 INT8 ``CONV_2D`` + 1 float, 16 INT8
``DEPTHWISE_CONV_2D``, 9 INT8 ``ADD``, 6 INT8 ``MEAN``, float ``FULLY_CONNECTED``/``SOFTMAX``/
``CONCATENATION``). Any int32 bias at the int32 limits (a near-dead channel's overflow, see the
PyTorch route's docstring) fails the export.

The same export model is also written as ``model.fp32.raw.onnx`` (:mod:`training.keras.export_onnx`),
which the main environment finishes into ``model.fp32.onnx``, the FP32 graph the shared ``quantize``
stage turns into the ONNX Runtime INT8 file (:mod:`training.keras.handoff`).

Checked on the run's validation inputs against the Keras FP32 export model: per output max
|INT8 - FP32|, validation AUC of both, and the INT8 outputs are saved (``keras_tflite_val.npz``)
for the main environment's check.

Why one module over 500 lines: the export model, the two-step conversion and the check of its
result share the op names and the denylist; the PyTorch route's export is one module for the same
reason.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import time
import warnings
from pathlib import Path
from typing import Any

import flatbuffers
import keras
import numpy as np
import tensorflow as tf
from keras import layers
from tensorflow.lite.python import convert as tfl_convert
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.python import util as tfl_util

from ..export.tflite_io import dequantized as _dequantized
from ..export.tflite_io import quantized_input
from ..run_files import (
    FP32_RAW_NAME,
    KERAS_INPUTS_NAME,
    KERAS_MODEL_NAME,
    KERAS_TFLITE_NAME,
    KERAS_TFLITE_SUMMARY,
    KERAS_TFLITE_VAL,
)
from .efficientnet_lite import LITE0_STAGES
from .export_onnx import convert_fp32_onnx
from .inputs import KerasInputs, read_inputs
from .scores import roc_auc

__all__ = [
    "CAM_NAME",
    "FEATURES_NAME",
    "FEATURE_BLOCKS",
    "PROBABILITIES_NAME",
    "QUANTIZATION",
    "build_export_model",
    "convert_int8",
    "feature_layers",
    "input_range",
    "main",
    "op_profile",
    "predict_tflite",
    "run_export",
]

#: The output names (signature and tensor names of the file; the manifest's, like the PyTorch route's).
PROBABILITIES_NAME = "probabilities"
CAM_NAME = "cam"
FEATURES_NAME = "features"
INPUT_NAME = "input"
#: Same scheme as the PyTorch route's file: static INT8 weights (per channel) and activations.
QUANTIZATION = "int8-static-wi8-ai8"
#: Ops left float (the PyTorch route's float head); the CAM's CONV_2D is denylisted by node.
FLOAT_OPS = ("FULLY_CONNECTED", "SOFTMAX", "CONCATENATION")
#: Ops that must be INT8 in the result (the CAM's CONV_2D excepted).
INT8_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN")
_INT32_LIMIT = 2**31 - 1


def _stage_end_blocks() -> tuple[int, ...]:
    """The last block of each stage of two or more blocks (``training.model.models._stage_ends``)."""
    ends, start = [], 0
    for repeats, *_ in LITE0_STAGES:
        if repeats >= 2:
            ends.append(start + repeats - 1)
        start += repeats
    return tuple(ends)


#: Blocks whose pooled outputs make the features output: (2, 4, 7, 10, 14).
FEATURE_BLOCKS = _stage_end_blocks()


def feature_layers() -> tuple[list[str], list[int]]:
    """The manifest's ``output.features`` ``layers`` (PyTorch module names) and ``dims``."""
    dims, block = [], 0
    for repeats, *_, filters in LITE0_STAGES:
        for _ in range(repeats):
            if block in FEATURE_BLOCKS:
                dims.append(filters)
            block += 1
    return [f"_blocks.{i}" for i in FEATURE_BLOCKS], dims


def input_range(spec: dict[str, Any]) -> tuple[float, float]:
    """Every input value's range: ``preprocess`` maps [0, 1] through ``(v - mean) / std`` per channel."""
    channels = int(spec["channels"])
    mean = np.broadcast_to(np.asarray(spec["mean"], dtype=np.float64), (channels,))
    std = np.broadcast_to(np.asarray(spec["std"], dtype=np.float64), (channels,))
    ends = np.concatenate([(0.0 - mean) / std, (1.0 - mean) / std])
    return float(ends.min()), float(ends.max())


def build_export_model(model: keras.Model) -> keras.Model:
    """``model.keras`` (input -> probabilities) -> ``input -> {probabilities, cam, features}``.

    The probabilities are the saved model's own output; ``cam`` is ``fc`` (temperature folded)
    as a 1x1 convolution on ``head_relu6`` (what ``avg_pooling`` averages), ``features`` the pooled
    outputs of :data:`FEATURE_BLOCKS`, concatenated.
    """
    last_conv = model.get_layer("head_relu6").output
    kernel, bias = model.get_layer("fc").get_weights()
    cam_layer = layers.Conv2D(kernel.shape[1], 1, name=CAM_NAME)
    cam = cam_layer(last_conv)
    cam_layer.set_weights([kernel[None, None], bias])
    pooled = [
        layers.GlobalAveragePooling2D(name=f"features_pool_{i}")(model.get_layer(f"blocks_{i}_add").output)
        for i in FEATURE_BLOCKS
    ]
    features = layers.Concatenate(name=FEATURES_NAME)(pooled)
    outputs = {PROBABILITIES_NAME: model.output, CAM_NAME: cam, FEATURES_NAME: features}
    return keras.Model(model.input, outputs, name="efficientnet_lite0_export")


def _read(model_bytes: bytes) -> Any:
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model_bytes, 0))


def _write(model: Any) -> bytes:
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _op_name(model: Any, op: Any) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    number = max(code.builtinCode, code.deprecatedBuiltinCode)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return str(names.get(number, number))


def _decoded(name: Any) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def _set_input_range(calibrated: bytes, low: float, high: float) -> bytes:
    """The calibrated model with its input's recorded min/max replaced by ``[low, high]``."""
    model = _read(calibrated)
    graph = model.subgraphs[0]
    tensor = graph.tensors[graph.inputs[0]]
    if tensor.quantization is None or tensor.quantization.min is None:
        raise RuntimeError("the calibrated model has no statistics for its input")
    tensor.quantization.min = np.array([low], dtype=np.float32)
    tensor.quantization.max = np.array([high], dtype=np.float32)
    return _write(model)


def _heatmap_nodes(calibrated: bytes) -> list[str]:
    """Names of the rank-4 graph outputs (the CAM), which the quantizer's denylist takes by node."""
    model = _read(calibrated)
    graph = model.subgraphs[0]
    return [_decoded(graph.tensors[i].name) for i in graph.outputs if len(graph.tensors[i].shape) == 4]


def _name_io(model_bytes: bytes, classes: int) -> bytes:
    """Name the input ``input`` and the outputs ``probabilities``, ``cam`` and ``features``.

    The converter names them ``tfl.quantize``, ``Identity``, ``Identity_1`` ... and writes no
    signature; they are told apart as the edge's backend does: the rank-4 output is the map, the
    rank-2 output one column per class wide the probabilities, the other rank-2 one the features.
    """
    model = _read(model_bytes)
    graph = model.subgraphs[0]
    graph.tensors[graph.inputs[0]].name = INPUT_NAME.encode()
    for index in graph.outputs:
        shape = list(graph.tensors[index].shape)
        if len(shape) == 4:
            name = CAM_NAME
        elif len(shape) == 2 and shape[1] == classes:
            name = PROBABILITIES_NAME
        else:
            name = FEATURES_NAME
        graph.tensors[index].name = name.encode()
    return _write(model)


def saturated_biases(model_bytes: bytes) -> int:
    """How many int32 biases of (depthwise) convolutions and fully connected ops sit at the int32 limits."""
    model = _read(model_bytes)
    graph = model.subgraphs[0]
    count = 0
    for op in graph.operators:
        if _op_name(model, op) not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        if len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        tensor = graph.tensors[op.inputs[2]]
        data = model.buffers[tensor.buffer].data
        if tensor.type == schema.TensorType.INT32 and data is not None:
            values = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype="<i4").astype(np.int64)
            count += int(np.count_nonzero(np.abs(values) >= _INT32_LIMIT))
    return count


def op_profile(model_bytes: bytes) -> dict[str, int]:
    """``"OP dtype" -> count``, the dtype being the op's first input's (as the PyTorch route's test reads)."""
    model = _read(model_bytes)
    graph = model.subgraphs[0]
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    counts: collections.Counter[str] = collections.Counter()
    for op in graph.operators:
        first = op.inputs[0] if len(op.inputs) else -1
        dtype = types.get(graph.tensors[first].type, "?") if first >= 0 else "-"
        counts[f"{_op_name(model, op)} {dtype}"] += 1
    return dict(sorted(counts.items()))


def convert_int8(
    export: keras.Model, calibration: np.ndarray, value_range: tuple[float, float]
) -> tuple[bytes, dict[str, Any]]:
    """The INT8 ``.tflite`` of ``export`` (fixed batch 1), calibrated on ``calibration`` (NHWC float32).

    Returns the file's bytes and what was done (see the module docstring).
    """
    h, w, c = (int(d) for d in export.input.shape[1:])

    @tf.function(input_signature=[tf.TensorSpec([1, h, w, c], tf.float32, name=INPUT_NAME)])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return export(x, training=False)

    # Without the trackable object the converter freezes the variables into constants (with it, this
    # TensorFlow keeps READ_VARIABLE ops that its calibrator cannot run).
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.float32

    def representative() -> Any:
        for i in range(len(calibration)):
            yield [calibration[i : i + 1]]

    converter.representative_dataset = representative
    converter._experimental_calibrate_only = True  # the first half of convert(); see the docstring
    with warnings.catch_warnings():
        # Calibration alone leaves the input's statistics to the quantizer: set below (value_range).
        warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
        calibrated = converter.convert()
    model = _read(calibrated)
    graph = model.subgraphs[0]
    stats = graph.tensors[graph.inputs[0]].quantization
    calibrated_range = [float(stats.min[0]), float(stats.max[0])]
    calibrated = _set_input_range(calibrated, *value_range)
    heatmap_nodes = _heatmap_nodes(calibrated)
    quantized = tfl_convert.mlir_quantize(
        calibrated,
        fully_quantize=False,
        input_data_type=tf.float32,
        output_data_type=tf.float32,
        denylisted_ops=list(FLOAT_OPS),
        denylisted_nodes=heatmap_nodes,
    )
    quantized = tfl_util.modify_model_io_type(quantized, tf.int8, tf.float32)
    quantized = _name_io(quantized, _classes(export))
    ops = op_profile(quantized)
    trunk_float = {k: v for k, v in ops.items() if k.split()[0] in INT8_OPS and not k.endswith(" int8")}
    if trunk_float != {"CONV_2D float32": 1}:  # the CAM's alone
        raise RuntimeError(f"the quantizer left trunk ops float (or the CAM INT8): {trunk_float}")
    saturated = saturated_biases(quantized)
    if saturated:
        raise RuntimeError(
            f"{saturated} int32 bias values of the quantized model are saturated; it would silently "
            "lose those channels' offsets."
        )
    return quantized, {
        "float_ops": [*FLOAT_OPS, f"CONV_2D {CAM_NAME} (node {', '.join(heatmap_nodes)})"],
        "calibrated_input_range": calibrated_range,
        "input_range": list(value_range),
        "saturated_biases": saturated,
    }


def _classes(export: keras.Model) -> int:
    return int(export.output[PROBABILITIES_NAME].shape[-1])


def _interpreter(model: bytes | str | Path, threads: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice (ai-edge-litert)
        from tensorflow.lite.python.interpreter import Interpreter

        if isinstance(model, bytes):
            interpreter = Interpreter(model_content=model, num_threads=threads)
        else:
            interpreter = Interpreter(model_path=str(model), num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def predict_tflite(model: bytes | str | Path, samples: np.ndarray, threads: int = 2) -> dict[str, np.ndarray]:
    """The named outputs of the file for NHWC float32 ``samples``, one image per run (batch 1)."""
    interpreter = _interpreter(model, threads)
    inp = interpreter.get_input_details()[0]
    outputs = {_decoded(d["name"]): d for d in interpreter.get_output_details()}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for i in range(len(samples)):
        x = samples[i : i + 1]
        interpreter.set_tensor(inp["index"], quantized_input(x, inp))
        interpreter.invoke()
        for name, detail in outputs.items():
            rows[name].append(_dequantized(interpreter, detail))
    return {name: np.concatenate(values) for name, values in rows.items()}


def tensor_details(model: bytes | str | Path) -> dict[str, Any]:
    """The file's input and outputs: name, shape, dtype, (scale, zero point)."""
    interpreter = _interpreter(model, 1)

    def describe(detail: dict[str, Any]) -> dict[str, Any]:
        scale, zero = detail["quantization"]
        return {
            "name": _decoded(detail["name"]),
            "shape": [int(d) for d in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name,
            "scale": float(scale),
            "zero_point": int(zero),
        }

    return {
        "input": describe(interpreter.get_input_details()[0]),
        "outputs": [describe(d) for d in interpreter.get_output_details()],
        "signatures": interpreter.get_signature_list(),
    }


def _calibration_rows(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded, class-stratified sample of ``count`` training rows (the PyTorch route's rule), sorted."""
    rng = np.random.default_rng(seed)
    picks: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        share = max(1, round(count * members.size / labels.size))
        picks.extend(rng.choice(members, size=min(share, members.size), replace=False).tolist())
    return np.array(sorted(picks), dtype=np.int64)


def _per_stage(reference: np.ndarray, other: np.ndarray, dims: list[int]) -> dict[str, list[float]]:
    errors, correlations, start = [], [], 0
    for dim in dims:
        a = reference[:, start : start + dim].astype(np.float64)
        b = other[:, start : start + dim].astype(np.float64)
        errors.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)))
        correlations.append(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.std() > 0 else float("nan"))
        start += dim
    return {"relative_error": errors, "correlation": correlations}


def _compare(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], data: KerasInputs) -> dict[str, Any]:
    """Per output: max and mean |INT8 - FP32| on the validation inputs."""
    positive = len(data.classes) - 1
    layers_, dims = feature_layers()
    out: dict[str, Any] = {}
    for name in (PROBABILITIES_NAME, CAM_NAME, FEATURES_NAME):
        diff = np.abs(int8[name].astype(np.float64) - fp32[name].astype(np.float64))
        out[name] = {
            "shape": [1, *int8[name].shape[1:]],
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "fp32_range": [float(fp32[name].min()), float(fp32[name].max())],
        }
    p32, p8 = fp32[PROBABILITIES_NAME][:, positive], int8[PROBABILITIES_NAME][:, positive]
    out[PROBABILITIES_NAME]["decision_agreement_at_0.5"] = float(np.mean((p32 >= 0.5) == (p8 >= 0.5)))
    # The CAM's spatial mean is the calibrated logits (mean-pooling, then the linear fc).
    logits = np.log(np.clip(fp32[PROBABILITIES_NAME], 1e-30, None))
    margin_map = fp32[CAM_NAME].mean(axis=(1, 2))
    out[CAM_NAME]["fp32_mean_vs_logit_margin_max_abs"] = float(
        np.abs((margin_map[:, 1] - margin_map[:, 0]) - (logits[:, 1] - logits[:, 0])).max()
    )
    out[FEATURES_NAME].update(
        {"layers": layers_, "dims": dims, **_per_stage(fp32[FEATURES_NAME], int8[FEATURES_NAME], dims)}
    )
    return out


def run_export(
    run: str | Path, *, calibration_images: int = 200, seed: int = 2018, threads: int = 2
) -> dict[str, Any]:
    """Build, convert and check; writes the ``.tflite``, the validation outputs and the summary."""
    t_start = time.monotonic()
    run = Path(run)
    data = read_inputs(run / KERAS_INPUTS_NAME)
    model = keras.models.load_model(run / KERAS_MODEL_NAME)
    export = build_export_model(model)

    rows = _calibration_rows(data.train_labels, calibration_images, seed)
    calibration = data.samples("train", 0, rows)  # view 0: unaugmented, as the PyTorch route calibrates
    t0 = time.monotonic()
    tflite, info = convert_int8(export, calibration, input_range(data.spec))
    t_convert = time.monotonic() - t0
    out = run / KERAS_TFLITE_NAME
    out.write_bytes(tflite)
    onnx_info = convert_fp32_onnx(  # finished into model.fp32.onnx by the main environment (handoff)
        export,
        run / FP32_RAW_NAME,
        input_name=INPUT_NAME,
        outputs=[PROBABILITIES_NAME, CAM_NAME, FEATURES_NAME],
        maps={CAM_NAME},
    )

    val = data.samples("val", 0)
    t0 = time.monotonic()
    fp32_raw = export.predict(val, batch_size=32, verbose=0)
    fp32 = {name: np.asarray(fp32_raw[name], dtype=np.float32) for name in fp32_raw}
    t1 = time.monotonic()
    int8 = predict_tflite(out, val, threads)
    t_int8 = time.monotonic() - t1
    t_check = time.monotonic() - t0
    positive = len(data.classes) - 1
    np.savez(
        run / KERAS_TFLITE_VAL,
        val_ids=data.arrays["val_ids"],
        val_labels=data.val_labels,
        **{f"fp32_{k}": v for k, v in fp32.items()},
        **{f"int8_{k}": v for k, v in int8.items()},
    )
    features_layers, features_dims = feature_layers()
    summary: dict[str, Any] = {
        "framework": "keras",
        "model": str(run / KERAS_MODEL_NAME),
        "out": str(out),
        "size_bytes": out.stat().st_size,
        "quantization": QUANTIZATION,
        "converter": "tf.lite.TFLiteConverter (TFLITE_BUILTINS_INT8) calibration + MLIR quantizer",
        "calibration_images": len(rows),
        "calibration_split": "train",
        **info,
        "ops": op_profile(tflite),
        "tensors": tensor_details(out),
        "input_layout": "NHWC",
        "output": {
            "name": PROBABILITIES_NAME,
            "heatmap": {"name": CAM_NAME, "kind": "class-activation"},
            "features": {"name": FEATURES_NAME, "layers": features_layers, "dims": features_dims},
        },
        "classes": data.classes,
        "fp32_onnx": onnx_info,
        "validation_images": len(data.val_labels),
        "int8_vs_keras_fp32": _compare(fp32, int8, data),
        "seconds": {
            "convert": t_convert,
            "fp32_onnx": onnx_info["seconds"],
            "check": t_check,
            "int8_per_image": t_int8 / max(len(val), 1),
            "total": time.monotonic() - t_start,
        },
        "environment": {
            **{
                name: importlib.metadata.version(name)
                for name in ("tensorflow-cpu", "keras", "numpy", "tf2onnx", "onnx")
            },
            "threads": threads,
        },
    }
    if len(np.unique(data.val_labels)) == 2:
        summary["val_auc"] = {
            "keras_fp32": roc_auc(data.val_labels, fp32[PROBABILITIES_NAME][:, positive]),
            "int8": roc_auc(data.val_labels, int8[PROBABILITIES_NAME][:, positive]),
        }
    (run / KERAS_TFLITE_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    probabilities = summary["int8_vs_keras_fp32"][PROBABILITIES_NAME]
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {t_convert:.1f} s from {len(rows)} training "
        f"inputs; INT8 vs Keras FP32 on {len(val)} validation inputs: max |dp| "
        f"{probabilities['max_abs_diff']:.4f} (mean {probabilities['mean_abs_diff']:.5f})"
        + (
            f"; val AUC FP32 {summary['val_auc']['keras_fp32']:.4f}, INT8 {summary['val_auc']['int8']:.4f}"
            if "val_auc" in summary
            else ""
        ),
        flush=True,
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training/keras_env.sh python -m training.keras.export_tflite",
        description="Convert a Keras run's model.keras to an INT8 LiteRT file (probabilities, CAM heat-map, "
        "pooled features) with TensorFlow's converter, calibrated on training inputs of keras-inputs.npz, "
        f"and to the FP32 ONNX graph the quantize stage reads (tf2onnx); writes {KERAS_TFLITE_NAME}, "
        f"{FP32_RAW_NAME}, {KERAS_TFLITE_VAL} and {KERAS_TFLITE_SUMMARY} in the run folder.",
    )
    p.add_argument("--run", type=Path, required=True, help="run folder of train --framework keras")
    p.add_argument("--calibration-images", type=int, default=200, help="training inputs (default 200)")
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.calibration_images < 1:
        raise SystemExit("--calibration-images must be at least 1")
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    run_export(args.run, calibration_images=args.calibration_images, seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
