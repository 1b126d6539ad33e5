"""The Keras route's FP32 ONNX file (runs ONLY in ``.venv-keras``): the export model -> ``model.fp32.onnx``.

Why an ONNX file from a Keras model: the runtime's default backend is ONNX Runtime, and the PyTorch
route's ``quantize`` stage (ONNX Runtime's static quantizer with the ``u8s8-rr`` recipe and bias
correction, :mod:`training.export.onnx_export`) is what makes an INT8 model compute the same integers
on AVX2, AVX-512 VNNI and ARM. So the Keras route hands that stage the same FP32 graph contract the
PyTorch exporter writes, and from there on both routes share every stage (``quantize``, ``ood``,
``evaluate``, ``package``):

* input ``input`` ``[batch, C, H, W]`` float32, the preprocessing spec's NCHW tensor (the Keras model
  is NHWC: a transpose at the front, which tf2onnx's optimizer folds into the first convolution);
* outputs, in this order, ``probabilities`` ``[batch, classes]`` (softmax inside, temperature folded
  into ``fc``), ``cam`` ``[batch, classes, h, w]`` (the map transposed to the PyTorch route's layout)
  and ``features`` ``[batch, 448]``.

tf2onnx's ``from_function`` traces a ``tf.function`` of the Keras model (its ``from_keras`` does not
support Keras 3); the EfficientNet ``Normalization``-layer problem seen with
``keras.applications`` does not arise because normalisation is the runtime's preprocessing, outside
the model. Opset 17, as the PyTorch route. The main environment checks the file against the Keras
FP32 outputs through the edge's ONNX Runtime backend (:mod:`training.keras.handoff`).
"""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path
from typing import Any

import keras
import onnx
import tensorflow as tf
import tf2onnx

__all__ = ["OPSET", "convert_fp32_onnx"]

OPSET = 17
BATCH = "batch"


def _name_batch_axis(model: onnx.ModelProto) -> None:
    """Every input's and output's first axis is called ``batch`` (tf2onnx writes ``unk__N``)."""
    for value in [*model.graph.input, *model.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        first.ClearField("dim_value")
        first.dim_param = BATCH


def _order_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """The graph's outputs in ``names`` order (tf2onnx sorts a dict's keys)."""
    by_name = {o.name: o for o in model.graph.output}
    if sorted(by_name) != sorted(names):
        raise RuntimeError(f"the ONNX graph has outputs {sorted(by_name)}, expected {sorted(names)}")
    ordered = [onnx.ValueInfoProto.FromString(by_name[n].SerializeToString()) for n in names]
    del model.graph.output[:]
    model.graph.output.extend(ordered)


def convert_fp32_onnx(
    export: keras.Model, path: str | Path, *, input_name: str, outputs: list[str], maps: set[str]
) -> dict[str, Any]:
    """Write ``export`` (NHWC input, a dict of outputs) as an NCHW FP32 ONNX graph.

    Args:
        export: The Keras export model (:func:`training.keras.export_tflite.build_export_model`).
        path: The ``.onnx`` file to write.
        input_name: The graph input's name.
        outputs: The output names, in the order the graph lists them.
        maps: The rank-4 (NHWC) outputs, written ``[batch, channels, h, w]``.
    """
    h, w, c = (int(d) for d in export.input.shape[1:])

    @tf.function(input_signature=[tf.TensorSpec([None, c, h, w], tf.float32, name=input_name)])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        out = export(tf.transpose(x, [0, 2, 3, 1]), training=False)
        return {
            name: tf.transpose(out[name], [0, 3, 1, 2]) if name in maps else tf.identity(out[name])
            for name in outputs
        }

    t0 = time.monotonic()
    model, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=OPSET)
    _name_batch_axis(model)
    _order_outputs(model, outputs)
    model.producer_name = "tf2onnx (training.keras.export_onnx)"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "file": Path(path).name,
        "opset": OPSET,
        "converter": f"tf2onnx {importlib.metadata.version('tf2onnx')} from_function (tf.function of the "
        "export model, NCHW input transposed inside)",
        "size_bytes": Path(path).stat().st_size,
        "ops": dict(sorted(ops.items())),
        "seconds": time.monotonic() - t0,
    }
