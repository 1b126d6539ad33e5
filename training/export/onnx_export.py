"""ONNX export, INT8 static quantization, and the FP32/INT8/PyTorch agreement check.

The exported graph takes the edge's preprocessed tensor (``input``,
``[batch, 3, H, W]`` float32, the run's preprocessing size; 224 by default) and returns ``probabilities``
(``[batch, 2]``, softmax inside the graph), so the edge needs no knowledge
of logits. Export uses the TorchScript-based exporter because opset 17 is
required and the dynamo exporter only emits opset 18 for this model (its
down-conversion of ``Pad`` fails); ``quant_pre_process`` then folds the
exporter's shape arithmetic around the "same" padding into constants, which
leaves a clean Conv/Clip/Add graph for the quantizer.

Quantization is static, QDQ format, per-channel INT8 weights and INT8
activations for every convolution, calibrated on ~200 *training* images
preprocessed with the shared spec (never validation or test images, which
judge the result); the tiny classifier and the softmax stay FP32 (see
:func:`quantize_int8`).

Why one module over 500 lines: for now it holds both the export and the quantize
stage. The natural seam is quantization (recipes, :func:`quantize_int8`,
:func:`correct_biases`) into its own module; not yet done (issue 13).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from tqdm import tqdm

from edge_runtime.cpu import cpu_summary
from edge_runtime.preprocess import PreprocessSpec

from ..data.datasets import items_from_split, read_split, run_spec
from ..data.images import CXRDataset, Item
from ..evaluate.metrics import calibration_effect, compare_predictions, fit_temperature
from ..evaluate.scoring import INPUT_NAME, OUTPUT_NAME, features_of_file, file_scorer, run_head
from ..model.models import (
    CALIBRATION_NAME,
    CAM_NAME,
    FEATURES_NAME,
    ClassActivationModel,
    ProbabilityModel,
    apply_temperature,
    predict_logits,
    predict_torch,
    stage_taps,
    supports_cam,
)
from ..model.train import load_checkpoint
from ..run_files import (
    EXPORT_SUMMARY,
    FP32_NAME,
    FP32_RAW_NAME,
    INT8_NAME,
    SPLIT_NAME,
    VAL_PREDICTIONS,
    framework_column,
)
from .emulation import AVX2_ONLY_CPU, emulator, outputs_emulated, predict_emulated

__all__ = [
    "DEFAULT_RECIPE",
    "FP32_NAME",
    "INT8_NAME",
    "RECIPES",
    "ProbabilityModel",
    "QuantRecipe",
    "calibration_samples",
    "compare_features",
    "compare_predictions",
    "correct_biases",
    "export_onnx",
    "features_output",
    "heatmap_output",
    "integer_ranges",
    "load_split",
    "ort_session",
    "predict_onnx",
    "quantization_label",
    "quantize_int8",
    "run_export",
    "run_fp32_export",
    "run_quantize",
    "val_tensors",
]

_KEEP_FLOAT_OPS = ("Gemm", "Softmax")


def export_onnx(
    model: nn.Module,
    path: str | Path,
    spec: PreprocessSpec,
    opset: int = 17,
    heatmap: bool = True,
    features: bool = False,
) -> Path:
    """Export ``model`` (logits) to an FP32 ONNX file that outputs probabilities (and a heat-map).

    Args:
        model: Trained classifier returning logits.
        path: Destination ``.onnx``.
        spec: Preprocessing spec; fixes the non-batch input dimensions.
        opset: ONNX opset (17: what the edge's onnxruntime floor supports).
        heatmap: Add the second output ``cam`` (``[batch, classes, h, w]`` logit maps of the
            last convolutional features, :class:`~training.model.models.ClassActivationModel`) when
            the architecture allows it (one linear layer after global pooling). The first
            output, ``probabilities``, is the same either way.
        features: Add the output ``features`` (``[batch, sum(dims)]``, the global average of
            each stage end's activations, :func:`~training.model.models.stage_taps`), last;
            the out-of-distribution check reads it. :func:`features_output` says which layers.
            The ``export`` stage sets it; off by default for callers that want the graph alone.

    Returns:
        ``path``, holding a checked, shape-inferred, constant-folded graph
        with a dynamic batch axis.
    """
    path = Path(path)
    model = model.to(memory_format=torch.contiguous_format)
    with_cam = heatmap and supports_cam(model)
    wrapped: nn.Module = (
        ClassActivationModel(model, features=features) if with_cam else ProbabilityModel(model, features)
    ).eval()
    outputs = [OUTPUT_NAME, CAM_NAME] if with_cam else [OUTPUT_NAME]
    if features:
        outputs.append(FEATURES_NAME)
    dummy = torch.zeros((2, *spec.sample_shape), dtype=torch.float32)
    raw = path.with_name(FP32_RAW_NAME) if path.name == FP32_NAME else path.with_suffix(".raw.onnx")
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation and notes un-foldable Slice steps;
        # both are expected here and the next step folds the graph anyway.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            wrapped,
            (dummy,),
            str(raw),
            input_names=[INPUT_NAME],
            output_names=outputs,
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            do_constant_folding=True,
        )
    return finish_fp32_graph(raw, path)


def finish_fp32_graph(raw: str | Path, path: str | Path) -> Path:
    """An exporter's raw graph -> the FP32 file the ``quantize`` stage reads; ``raw`` is removed.

    ``quant_pre_process`` (ONNX Runtime's hardware-independent optimizations and shape inference)
    folds constant arithmetic and, for tf2onnx's graphs (the Keras route), the depthwise
    convolutions' BatchNorm ``Mul``/``Add`` into the convolutions and ``MatMul`` + ``Add`` into one
    ``Gemm``: the same Conv/Clip/Add graph with a ``Gemm`` head from either exporter.
    """
    path = Path(path)
    quant_pre_process(str(raw), str(path))
    Path(raw).unlink()
    graph = onnx.load(str(path))
    nodes = list(graph.graph.node)
    last = next(n for n in nodes if OUTPUT_NAME in n.output)
    if nodes[-1] is not last:
        # Keep the graph ending in the softmax, as without the map: nothing consumes the
        # probabilities, so moving their producer last keeps the order topological.
        del graph.graph.node[:]
        graph.graph.node.extend([n for n in nodes if n is not last] + [last])
        onnx.save(graph, str(path))
    onnx.checker.check_model(graph, full_check=True)
    return path


def heatmap_output(path: str | Path) -> dict[str, Any] | None:
    """The exported file's heat-map output as the manifest names it (None: it has none)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for output in graph.output:
        if output.name == CAM_NAME:
            dims = [d.dim_value or d.dim_param for d in output.type.tensor_type.shape.dim]
            return {"name": CAM_NAME, "kind": "class-activation", "shape": dims}
    return None


def features_output(model: nn.Module, spec: PreprocessSpec) -> dict[str, Any]:
    """The features output :func:`export_onnx` adds, as the manifest names it (``output.features``)."""
    taps = stage_taps(model, tuple(spec.sample_shape))  # type: ignore[arg-type]
    return {"name": FEATURES_NAME, "layers": list(taps.layers), "dims": list(taps.dims)}


class _ArrayReader(CalibrationDataReader):
    """Feeds calibration batches from an in-memory array."""

    def __init__(self, samples: np.ndarray, batch_size: int = 16) -> None:
        self._batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        batch = self._batches[self._next]
        self._next += 1
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._next = 0


@dataclass(frozen=True)
class QuantRecipe:
    """One way to quantize: activation and weight types, and 7-bit weights or not."""

    name: str
    activation: QuantType
    weight: QuantType
    reduce_range: bool
    summary: str
    #: ``edge_runtime.cpu`` ``int8_dot`` values where the recipe computes like the build machine;
    #: empty = every CPU. The bundle records it and the runtime refuses the model elsewhere.
    trusted_int8_dot: tuple[str, ...] = ()


#: Candidate recipes, compared by ``benchmarks/bench_quantization.py`` (training/README.md,
#: "Export and quantization", has the measurements behind the default).
RECIPES: dict[str, QuantRecipe] = {
    recipe.name: recipe
    for recipe in (
        QuantRecipe(
            "u8s8-rr",
            QuantType.QUInt8,
            QuantType.QInt8,
            True,
            "uint8 activations, int8 weights limited to 7 bits (-64..64): u8 x s7 pairs never "
            "exceed 2*255*64 = 32640, so AVX2's 16-bit VPMADDUBSW cannot saturate and every CPU "
            "computes the same integers",
        ),
        QuantRecipe(
            "s8s8",
            QuantType.QInt8,
            QuantType.QInt8,
            False,
            "int8 activations and full 8-bit weights (bundles <= 0.1.1): pairs reach 2*255*128 "
            "after the kernel's sign shift, which saturates on CPUs without VNNI",
            ("vnni", "arm-dot"),
        ),
        QuantRecipe("s8s8-rr", QuantType.QInt8, QuantType.QInt8, True, "int8 activations, 7-bit weights"),
        QuantRecipe(
            "u8s8",
            QuantType.QUInt8,
            QuantType.QInt8,
            False,
            "uint8 activations, 8-bit weights: u8 x s8 pairs reach 2*255*128, VPMADDUBSW saturates",
            ("vnni", "arm-dot"),
        ),
        QuantRecipe(
            "u8u8", QuantType.QUInt8, QuantType.QUInt8, False, "uint8 activations and weights (no VPMADDUBSW)"
        ),
    )
}
DEFAULT_RECIPE = "u8s8-rr"


def quantization_label(recipe: str) -> str:
    """What the manifest's ``quantization`` field says for an ONNX model made with ``recipe``."""
    return f"int8-qdq-static-per-channel-{recipe}"


def _with_outputs(model: onnx.ModelProto, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
    """Run ``model`` with extra intermediate tensors exposed as outputs; returns them for ``x``."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in present
    )
    # Not a scoring path (training.evaluate.scoring is): this runs a copy of the graph with intermediate
    # tensors exposed as outputs, from bytes, which no model bundle or backend ever holds.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [session.run(list(names), {INPUT_NAME: x[i : i + 50]}) for i in range(0, len(x), 50)]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(names))]


def correct_biases(int8_path: str | Path, fp32_path: str | Path, calibration: np.ndarray) -> dict[str, float]:
    """Empirical bias correction of a QDQ model, in place (Nagel et al., ICCV 2019, section 4.2).

    Rounding the weights to 7 bits shifts the *mean* output of a channel, and
    the shift accumulates through the network. Layer by layer, in graph order,
    the mean pre-activation of every INT8 convolution on the calibration
    images is measured against the FP32 model's and the difference is added
    to the convolution's int32 bias (already corrected layers feed the next
    measurement). Only the biases change, so the integer arithmetic, and its
    independence of the CPU, is untouched. 0.2.0 (96 px): mean |dp| against
    FP32 on validation 0.0055 -> 0.0036, max 0.42 -> 0.19.

    Returns the mean and max absolute bias change, in quantization steps.
    """
    quant, fp32 = onnx.load(str(int8_path)), onnx.load(str(fp32_path))
    fp32_convs = {n.name: n for n in fp32.graph.node if n.op_type == "Conv"}
    producer = {out: n for n in quant.graph.node for out in n.output}
    initializers = {t.name: t for t in quant.graph.initializer}
    convs = [
        n
        for n in quant.graph.node
        if n.op_type == "Conv"
        and n.name in fp32_convs
        and len(n.input) > 2
        and n.input[2] in producer
        and producer[n.input[2]].op_type == "DequantizeLinear"
        and producer[n.input[2]].input[0] in initializers
    ]
    references = [fp32_convs[n.name].output[0] for n in convs]
    expected = dict(zip(references, _with_outputs(fp32, references, calibration), strict=True))
    steps: list[float] = []
    for node in tqdm(convs, desc="bias correction", unit="conv", dynamic_ncols=True):
        (measured,) = _with_outputs(quant, [node.output[0]], calibration)
        shift = (expected[fp32_convs[node.name].output[0]] - measured).mean(axis=(0, 2, 3))
        dequantize = producer[node.input[2]]
        bias = initializers[dequantize.input[0]]
        scale = onnx.numpy_helper.to_array(initializers[dequantize.input[1]])
        delta = np.rint(shift / scale).astype(np.int64)
        corrected = onnx.numpy_helper.to_array(bias).astype(np.int64) + delta
        if np.abs(corrected).max() >= 2**31:
            continue  # would overflow the int32 bias: leave this layer as quantized
        bias.CopyFrom(onnx.numpy_helper.from_array(corrected.astype(np.int32), bias.name))
        steps.extend(np.abs(delta).tolist())
    onnx.save(quant, str(int8_path))
    return {
        "layers": len(convs),
        "mean_steps": float(np.mean(steps or [0])),
        "max_steps": float(max(steps or [0])),
    }


def quantize_int8(
    fp32_path: str | Path,
    int8_path: str | Path,
    calibration: np.ndarray,
    recipe: str = DEFAULT_RECIPE,
    bias_correction: bool = True,
) -> Path:
    """Static INT8 quantization (QDQ, per-channel weights) calibrated on ``calibration``.

    ``recipe`` names an entry of :data:`RECIPES`. The default, ``u8s8-rr``, is
    the one whose integer arithmetic is the same on AVX2, AVX-512 VNNI and
    ARM (see :class:`QuantRecipe` and training/README.md); ``s8s8`` is what
    bundles up to 0.1.1 used and differs by CPU.

    The classifier (``Gemm``) and the ``Softmax`` stay FP32 (a 1280x2 layer,
    10 KB), and so does the heat-map's 1x1 convolution (the classifier's
    weights applied at every location of the dequantized last features; it
    is as small). Quantizing the classifier puts the logits and probabilities on an 8-bit
    grid: every confident case then shares one of a handful of output values,
    the ranking between them is lost, and in the first run this cut the
    validation AUC from 0.999 (FP32) to 0.994 and left a threshold of
    254/255. The convolutions, where the time and the bytes are, are INT8.

    MinMax calibration is used: ~200 images are too few to estimate the
    tails that percentile/entropy calibration look at, and the result is
    compared with FP32 afterwards anyway. With ``bias_correction`` (default)
    the convolution biases are then corrected on the same calibration images
    (:func:`correct_biases`).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; known: {', '.join(RECIPES)}")
    chosen = RECIPES[recipe]
    graph = onnx.load(str(fp32_path))
    # The features' Concat stays float too: each pooled stage keeps its own quantization scale
    # (a shared one would round the narrow early stages away); concatenating computes nothing.
    keep_float = [
        node.name
        for node in graph.graph.node
        if node.op_type in _KEEP_FLOAT_OPS or CAM_NAME in node.output or FEATURES_NAME in node.output
    ]
    quantize_static(
        str(fp32_path),
        str(int8_path),
        _ArrayReader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=chosen.reduce_range,
        activation_type=chosen.activation,
        weight_type=chosen.weight,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=keep_float,
    )
    if bias_correction:
        correct_biases(int8_path, fp32_path, calibration)
    onnx.checker.check_model(onnx.load(str(int8_path)), full_check=True)
    return Path(int8_path)


def integer_ranges(int8_path: str | Path) -> dict[str, Any]:
    """What a QDQ model's integers look like: weight dtype and range, activation dtype.

    ``weights``: the dtype and min/max over every constant fed to a
    ``DequantizeLinear`` (the quantized weights); ``activations``: the dtypes
    of the ``QuantizeLinear`` outputs. A ``u8s8-rr`` model has uint8
    activations and int8 weights within -64..64, the ranges where AVX2's
    ``VPMADDUBSW`` cannot saturate; tests and the quantize stage check it.
    """
    graph = onnx.load(str(int8_path)).graph
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    weights = [
        initializers[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in initializers
        and initializers[n.input[0]].dtype in (np.int8, np.uint8)
        and initializers[n.input[0]].ndim == 4
    ]
    activations = {
        str(initializers[n.input[2]].dtype)
        for n in graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in initializers
    }
    return {
        "weight_dtypes": sorted({str(w.dtype) for w in weights}),
        "weight_min": int(min(w.min() for w in weights)) if weights else 0,
        "weight_max": int(max(w.max() for w in weights)) if weights else 0,
        "conv_weights": len(weights),
        "activation_dtypes": sorted(activations),
    }


def ort_session(path: str | Path, threads: int = 2) -> ort.InferenceSession:
    """A bare CPU session set up like the edge's (no thread spinning: it slows 2 threads).

    Not a scoring path: P(positive) in training, its reports and the
    benchmarks comes from :mod:`training.evaluate.scoring` (the edge's backend). This
    stays for callers that inspect the exported graph's session or want every
    output column (the export tests, ``benchmarks/bench_quantization.py``).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict_onnx(session: ort.InferenceSession, samples: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """``(N, classes)`` probabilities of an exported model (see :func:`ort_session`)."""
    outs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: samples[i : i + batch_size]})[0]
        for i in range(0, len(samples), batch_size)
    ]
    return np.concatenate(outs)


def load_split(run_dir: str | Path) -> tuple[Path, list[Item], list[Item]]:
    """The data root and the train/val items the run was trained with (``split.json``)."""
    dataset = items_from_split(read_split(Path(run_dir) / SPLIT_NAME))
    return dataset.root, list(dataset.train), list(dataset.val)


def _stack(dataset: CXRDataset, indices: Sequence[int], desc: str) -> np.ndarray:
    out = np.empty((len(indices), *dataset.spec.sample_shape), dtype=np.float32)
    for row, index in enumerate(tqdm(indices, desc=desc, unit="img", dynamic_ncols=True)):
        out[row] = dataset.sample(index)
    return out


def calibration_samples(run: Path, spec: PreprocessSpec, count: int, seed: int = 2018) -> np.ndarray:
    """A seeded, class-stratified sample of the run's *training* images, preprocessed (no augmentation)."""
    _, train_items, _ = load_split(run)
    rng = np.random.default_rng(seed)
    train_ds = CXRDataset(train_items, spec)
    labels = train_ds.labels
    picks: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        share = round(count * members.size / labels.size)
        picks.extend(rng.choice(members, size=min(share, members.size), replace=False).tolist())
    return _stack(train_ds, sorted(picks), "calibration")


def val_tensors(run: Path, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images as the edge builds them: ``(labels, tensors)``."""
    _, _, val_items = load_split(run)
    val_ds = CXRDataset(val_items, spec)
    return val_ds.labels, _stack(val_ds, range(len(val_ds)), "val tensors")


def _update_summary(run: Path, part: dict[str, Any]) -> dict[str, Any]:
    path = run / EXPORT_SUMMARY
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    summary.update(part)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def calibrate_temperature(model: nn.Module, run: Path, y: np.ndarray, val_x: np.ndarray) -> dict[str, Any]:
    """Fit temperature scaling on the validation split, fold it into ``model``, write ``calibration.json``.

    The network is trained to separate the classes, not to say how often it
    is right: the 0.1.x models put most outputs at ``p >= 0.999999`` and an
    operating point of 0.9999. One temperature fitted by log-loss on the
    validation split (Guo et al. 2017) keeps the ranking and every decision
    at a matched threshold, and makes a published 0.8 mean "about 8 in 10".
    """
    logits = predict_logits(model, val_x)
    margin = logits[:, 1] - logits[:, 0]
    temperature = fit_temperature(y, margin)
    before = 1.0 / (1.0 + np.exp(-margin.astype(np.float64)))
    after = 1.0 / (1.0 + np.exp(-margin.astype(np.float64) / temperature))
    record = {
        "temperature": temperature,
        "method": "temperature scaling fitted by log-loss on the validation split, folded into the "
        "last linear layer (softmax((Wx+b)/T))",
        "validation": calibration_effect(y, before, after),
    }
    (run / CALIBRATION_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    apply_temperature(model, temperature)
    return record


def run_fp32_export(
    run_dir: str | Path, spec: PreprocessSpec | None = None, threads: int = 2, calibrate: bool = True
) -> dict[str, Any]:
    """``export`` stage: checkpoint -> ``model.fp32.onnx``, checked against PyTorch on validation.

    With ``calibrate`` (the default) a temperature is fitted on validation and
    folded into the exported graph first (:func:`calibrate_temperature`), so
    the ONNX models, the TFLite model and every number computed from them
    are calibrated probabilities. Writes ``val_predictions.npz`` (labels,
    PyTorch and FP32 P(positive)) and the FP32 part of ``export_summary.json``.
    ``spec`` defaults to the one the run was trained with
    (:func:`training.data.datasets.run_spec`).
    """
    t_start = time.monotonic()
    torch.set_num_threads(threads)
    run = Path(run_dir)
    spec = spec or run_spec(run)
    model, ckpt = load_checkpoint(run)
    y, val_x = val_tensors(run, spec)
    calibration = calibrate_temperature(model, run, y, val_x) if calibrate else None
    if calibration is None:
        (run / CALIBRATION_NAME).unlink(missing_ok=True)
    fp32_path = export_onnx(model, run / FP32_NAME, spec, features=True)
    heatmap = heatmap_output(fp32_path)
    features = features_output(model, spec)
    head = run_head(read_split(run))
    p_torch = head.positive(predict_torch(model, val_x))
    with file_scorer(fp32_path, spec, head, threads) as scorer:
        p_fp32 = scorer(val_x)
    np.savez(run / VAL_PREDICTIONS, y=y, torch=p_torch, fp32=p_fp32)
    summary = _update_summary(
        run,
        {
            "opset": 17,
            "checkpoint_cut": ckpt.get("cut"),
            "temperature": calibration["temperature"] if calibration else 1.0,
            "sizes_bytes": {"fp32": fp32_path.stat().st_size},
            "heatmap": heatmap,
            "features": features,
            "val_n": int(y.size),
            "fp32_vs_torch": compare_predictions(p_torch, p_fp32, 0.5),
            "seconds": {"export": time.monotonic() - t_start},
        },
    )
    if calibration:
        v = calibration["validation"]
        tqdm.write(
            f"export: temperature {calibration['temperature']:.3f} fitted on validation: log-loss "
            f"{v['log_loss']['before']:.4f} -> {v['log_loss']['after']:.4f}, ECE "
            f"{v['ece_15_bins']['before']:.4f} -> {v['ece_15_bins']['after']:.4f}, outputs >= 0.999999 "
            f"{v['outputs_at_least_0.999999']['before']} -> {v['outputs_at_least_0.999999']['after']}"
        )
    tqdm.write(
        f"export: FP32 {fp32_path.stat().st_size / 1e6:.2f} MB; on {y.size} validation images "
        f"FP32 vs PyTorch max |dp| {summary['fp32_vs_torch']['max_abs_diff']:.2e}, decision agreement "
        f"{summary['fp32_vs_torch']['decision_agreement']:.2%} at p>=0.5"
    )
    return summary


def compare_features(
    fp32_path: Path,
    int8_path: Path,
    samples: np.ndarray,
    spec: PreprocessSpec,
    features: dict[str, Any],
    threads: int = 2,
) -> dict[str, Any]:
    """How far the INT8 file's pooled features are from the FP32 file's, per layer.

    ``relative_error``: ``||f_int8 - f_fp32|| / ||f_fp32||`` over the samples (Frobenius);
    ``correlation``: Pearson over all values of the layer. Both through the edge's backend.
    """
    width = sum(features["dims"])
    _, f32 = features_of_file(fp32_path, samples, spec, width, threads)
    _, f8 = features_of_file(int8_path, samples, spec, width, threads)
    errors: list[float] = []
    correlations: list[float] = []
    start = 0
    for dim in features["dims"]:
        a, b = f32[:, start : start + dim].astype(np.float64), f8[:, start : start + dim].astype(np.float64)
        errors.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)))
        correlations.append(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
        start += dim
    return {
        "layers": list(features["layers"]),
        "images": len(samples),
        "relative_error": errors,
        "correlation": correlations,
    }


def run_quantize(
    run_dir: str | Path,
    spec: PreprocessSpec | None = None,
    calibration_images: int = 200,
    seed: int = 2018,
    threads: int = 2,
    recipe: str = DEFAULT_RECIPE,
    emulate_images: int = 32,
) -> dict[str, Any]:
    """``quantize`` stage: ``model.fp32.onnx`` -> ``model.int8.onnx``, checked against FP32 and the framework.

    Calibrates on a seeded, class-stratified sample of *training* images (no
    augmentation), then scores INT8 on the validation split and adds it to
    ``val_predictions.npz`` and ``export_summary.json``, with this CPU's INT8
    features. Where QEMU is installed, the first ``emulate_images`` validation
    images are also run on an emulated AVX2-only CPU (:mod:`training.export.emulation`)
    and compared with this CPU's INT8 output (0 skips it). Needs the
    ``export`` stage's files in ``run_dir``.
    """
    t_start = time.monotonic()
    run = Path(run_dir)
    fp32_path = run / FP32_NAME
    predictions = run / VAL_PREDICTIONS
    if not fp32_path.is_file() or not predictions.is_file():
        raise FileNotFoundError(
            f"{fp32_path} or {predictions} is missing; run 'python -m training export --out {run}' first."
        )
    spec = spec or run_spec(run)
    calibration = calibration_samples(run, spec, calibration_images, seed)
    t0 = time.monotonic()
    int8_path = quantize_int8(fp32_path, run / INT8_NAME, calibration, recipe)
    t_quant = time.monotonic() - t0

    y, val_x = val_tensors(run, spec)
    with np.load(predictions) as saved:
        source = framework_column(saved.files)  # torch, or keras for a Keras run (training/keras/handoff.py)
        p_source, p_fp32 = saved[source], saved["fp32"]
        if not np.array_equal(saved["y"], y):
            raise ValueError(f"{predictions} does not belong to this run's validation split; re-run export.")
    head = run_head(read_split(run))
    with file_scorer(int8_path, spec, head, threads) as scorer:
        p_int8 = scorer(val_x)
    np.savez(predictions, y=y, **{source: p_source}, fp32=p_fp32, int8=p_int8)
    previous = json.loads((run / EXPORT_SUMMARY).read_text(encoding="utf-8"))
    features_agreement = (
        compare_features(fp32_path, int8_path, val_x, spec, previous["features"], threads)
        if previous.get("features")
        else None
    )
    cross_cpu: dict[str, Any] | None = None
    if emulate_images > 0 and emulator() is not None:
        subset = val_x[:emulate_images]
        t0 = time.monotonic()
        if previous.get("features"):
            # Probabilities and features from one emulated run; the features this CPU computes
            # come from the edge's backend, as in the agreement check above.
            emulated = outputs_emulated(int8_path, subset, [OUTPUT_NAME, FEATURES_NAME])
            p_emulated = head.positive(emulated[OUTPUT_NAME])
            _, here = features_of_file(int8_path, subset, spec, sum(previous["features"]["dims"]), threads)
            features_drift: float | None = float(np.abs(emulated[FEATURES_NAME] - here).max())
        else:
            p_emulated = head.positive(predict_emulated(int8_path, subset))
            features_drift = None
        cross_cpu = {
            "cpu": AVX2_ONLY_CPU,
            "images": len(subset),
            **compare_predictions(p_int8[: len(subset)], p_emulated, 0.5),
            "features_max_abs_diff": features_drift,
            "seconds": time.monotonic() - t0,
        }
    summary = _update_summary(
        run,
        {
            "calibration_images": len(calibration),
            "quantization": quantization_label(recipe),
            "quantization_recipe": recipe,
            "bias_correction": True,
            "cpu": cpu_summary(),
            "int8_vs_int8_emulated_avx2": cross_cpu,
            "sizes_bytes": {**previous.get("sizes_bytes", {}), "int8": int8_path.stat().st_size},
            "int8_vs_fp32": compare_predictions(p_fp32, p_int8, 0.5),
            f"int8_vs_{source}": compare_predictions(p_source, p_int8, 0.5),
            "features_int8_vs_fp32": features_agreement,
            "seconds": {
                **previous.get("seconds", {}),
                "quantize": t_quant,
                "quantize_total": time.monotonic() - t_start,
            },
        },
    )
    tqdm.write(
        "quantize: INT8 {int8:.2f} MB; on {n} validation images at p>=0.5: INT8 vs FP32 max |dp| "
        "{b:.4f} (mean {c:.4f}), decision agreement {d:.2%}".format(
            int8=int8_path.stat().st_size / 1e6,
            n=y.size,
            b=summary["int8_vs_fp32"]["max_abs_diff"],
            c=summary["int8_vs_fp32"]["mean_abs_diff"],
            d=summary["int8_vs_fp32"]["decision_agreement"],
        )
        + f" [recipe {recipe}; CPU {', '.join(summary['cpu']['int8_features']) or 'no SIMD int8'}]"
    )
    if features_agreement is not None:
        tqdm.write(
            "quantize: features INT8 vs FP32 on validation, relative error per layer "
            + ", ".join(
                f"{name} {err:.3f}"
                for name, err in zip(
                    features_agreement["layers"], features_agreement["relative_error"], strict=True
                )
            )
        )
    if cross_cpu is not None:
        tqdm.write(
            f"quantize: same INT8 model on an emulated AVX2-only CPU ({AVX2_ONLY_CPU}), "
            f"{cross_cpu['images']} validation images: max |dp| {cross_cpu['max_abs_diff']:.2e}, "
            f"decision agreement {cross_cpu['decision_agreement']:.2%}"
            + (
                f", features max |d| {cross_cpu['features_max_abs_diff']:.2e}"
                if cross_cpu["features_max_abs_diff"] is not None
                else ""
            )
        )
    return summary


def run_export(
    run_dir: str | Path,
    spec: PreprocessSpec | None = None,
    calibration_images: int = 200,
    seed: int = 2018,
    threads: int = 2,
    recipe: str = DEFAULT_RECIPE,
) -> dict[str, Any]:
    """Both stages: :func:`run_fp32_export` then :func:`run_quantize`; returns the combined summary.

    Writes ``model.fp32.onnx``, ``model.int8.onnx``, ``val_predictions.npz``
    (labels and P(positive) of PyTorch, FP32 and INT8 on the validation
    split, built with the edge code) and ``export_summary.json``.
    """
    run_fp32_export(run_dir, spec, threads)
    return run_quantize(run_dir, spec, calibration_images, seed, threads, recipe)
