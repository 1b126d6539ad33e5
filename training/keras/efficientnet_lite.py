"""EfficientNet-Lite0 in Keras 3, layer for layer ``efficientnet_lite_pytorch``'s, with its weights.

Runs ONLY inside ``.venv-keras`` (``training/keras_env.sh``; TensorFlow backend): keras is not in
the main environment, and torch is not in this one. The PyTorch weights arrive as the ``.npz``
that :mod:`training.keras.port_weights` writes in the main environment.

The architecture is the one ``EfficientNet.from_name("efficientnet-lite0")`` builds
(``training.model.models``), read from ``efficientnet_lite_pytorch`` (model.py, utils.py):

* stem: 3x3 stride-2 convolution to 32 channels, BatchNorm, ReLU6 (Lite: stem and head are not
  width-scaled, ReLU6 instead of swish, no squeeze-excite);
* 16 MBConv blocks (:data:`LITE0_STAGES`): 1x1 expansion (skipped when the ratio is 1), BN,
  ReLU6; depthwise kxk (stride 1 or 2), BN, ReLU6; 1x1 projection, BN (no activation); a skip
  connection when stride is 1 and the channel count is kept, with drop-connect (per-sample
  stochastic depth, rate ``0.2 * block / 16``) on the residual branch in training only;
* head: 1x1 convolution to 1280, BN, ReLU6; global average pooling, dropout 0.2, linear.
* Every BN has eps 1e-3 and PyTorch momentum 0.01, i.e. Keras momentum 0.99. No bias in any
  convolution (BN follows each).
* Padding: ``Conv2dStaticSamePadding`` is TensorFlow's SAME padding (the extra row/column of an
  odd total goes bottom/right: stride 2 pads (0, 1) for 3x3 and (1, 2) for 5x5 on even sizes),
  so Keras ``padding="same"`` is the same computation. PyTorch fixes the amounts for 224 px
  inputs at construction; they equal SAME's for any side that stays even at every stride-2
  layer, i.e. a multiple of 32 (96, 128, 224 ...): other sizes are refused.

Input: NHWC float32, ALREADY normalised (the shared preprocessing, or ImageNet mean/std for the
ImageNet weights). Normalisation stays outside the model on purpose: tf2onnx, the route to the
edge's ONNX Runtime, fails on Keras ``Normalization``/``Rescaling`` layers, and the edge applies
the bundle's preprocessing spec itself. Output: logits (no softmax).

Layer names come from the PyTorch names (:func:`keras_name`/:func:`torch_name`):
``_conv_stem`` -> ``conv_stem``, ``_blocks.3._expand_conv`` -> ``blocks_3_expand_conv``,
``_fc`` -> ``fc``; :func:`load_ported_weights` maps each weighted layer back and transposes
(conv OIHW -> HWIO, depthwise ``(C, 1, kh, kw)`` -> ``(kh, kw, C, 1)``, dense ``(out, in)`` ->
``(in, out)``, BN weight/bias/running_mean/running_var -> gamma/beta/moving_mean/moving_variance).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import keras
import numpy as np
from keras import layers

__all__ = [
    "LITE0_STAGES",
    "build_efficientnet_lite0",
    "keras_name",
    "load_ported_weights",
    "read_ported_weights",
    "torch_name",
]

#: (repeats, kernel, stride, expand ratio, input channels, output channels) per stage:
#: efficientnet_lite_builder's 'r1_k3_s11_e1_i32_o16', ... (width and depth 1.0 for Lite0).
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # PyTorch's momentum 1 - 0.99: Keras keeps the old statistics' weight instead
DROPOUT_RATE = 0.2
DROP_CONNECT_RATE = 0.2
#: Input sides must stay even at every stride-2 layer for SAME to equal PyTorch's fixed padding.
SIDE_MULTIPLE = 32
DATA_FORMAT = "channels_last"

_BLOCK_NAME = re.compile(r"blocks_(\d+)_(\w+)")
_HEAD_PREFIX = "_fc"


def keras_name(torch_prefix: str) -> str:
    """The Keras layer name of a PyTorch module: ``_blocks.3._bn0`` -> ``blocks_3_bn0``."""
    return "_".join(part.removeprefix("_") for part in torch_prefix.split("."))


def torch_name(layer_name: str) -> str:
    """The PyTorch module of a weighted Keras layer: ``blocks_3_bn0`` -> ``_blocks.3._bn0``."""
    block = _BLOCK_NAME.fullmatch(layer_name)
    return f"_blocks.{block[1]}._{block[2]}" if block else f"_{layer_name}"


def _relu6(name: str) -> layers.Layer:
    return layers.ReLU(max_value=6.0, name=name)


def _conv_bn(x: keras.KerasTensor, torch_conv: str, torch_bn: str, filters: int) -> keras.KerasTensor:
    """1x1 convolution (no bias) and its BatchNorm."""
    x = layers.Conv2D(
        filters, 1, padding="same", use_bias=False, data_format=DATA_FORMAT, name=keras_name(torch_conv)
    )(x)
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=keras_name(torch_bn))(x)


def _mbconv(
    x: keras.KerasTensor, index: int, kernel: int, stride: int, expand: int, filters: int, drop_rate: float
) -> keras.KerasTensor:
    """``MBConvBlock`` number ``index`` (Lite: no squeeze-excite, ReLU6)."""
    prefix = f"_blocks.{index}"
    inputs = x
    channels = int(x.shape[-1])
    if expand != 1:
        x = _conv_bn(x, f"{prefix}._expand_conv", f"{prefix}._bn0", channels * expand)
        x = _relu6(f"blocks_{index}_relu6_expand")(x)
    x = layers.DepthwiseConv2D(
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        data_format=DATA_FORMAT,
        name=keras_name(f"{prefix}._depthwise_conv"),
    )(x)
    x = layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=keras_name(f"{prefix}._bn1")
    )(x)
    x = _relu6(f"blocks_{index}_relu6_depthwise")(x)
    x = _conv_bn(x, f"{prefix}._project_conv", f"{prefix}._bn2", filters)
    if stride == 1 and channels == filters:  # every Lite0 block has id_skip
        if drop_rate:
            # drop_connect: the whole residual branch of a sample is dropped, the rest scaled by
            # 1 / (1 - rate); Dropout is the identity outside training, as drop_connect is.
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"blocks_{index}_drop_connect")(x)
        x = layers.Add(name=f"blocks_{index}_add")([x, inputs])
    return x


def build_efficientnet_lite0(
    num_classes: int = 1000,
    input_shape: tuple[int | None, int | None, int] = (224, 224, 3),
    weights_npz: str | Path | None = None,
    include_top: bool = True,
) -> keras.Model:
    """EfficientNet-Lite0 as a Keras 3 functional model (NHWC, normalised input -> logits).

    Args:
        num_classes: Outputs of the final ``fc`` layer (ImageNet's 1000 by default).
        input_shape: ``(height, width, channels)``; each known side a multiple of 32 (see the
            module docstring: the padding then equals PyTorch's).
        weights_npz: The ``.npz`` of :mod:`training.keras.port_weights`, or None for Keras's
            random initialisation. Loaded strictly (:func:`load_ported_weights`), except the
            ``_fc`` tensors when the model has no ``fc`` or another class count (transfer learning:
            ``fc`` then keeps its fresh initialisation, as ``training.model.models`` does).
        include_top: False ends the model at the pooled 1280-wide embedding (before dropout and
            ``fc``), the backbone the PyTorch route fine-tunes.

    Raises:
        ValueError: a side that is not a multiple of 32, or a weights file that does not fit.
    """
    odd = [side for side in input_shape[:2] if side is not None and side % SIDE_MULTIPLE]
    if odd:
        raise ValueError(
            f"input_shape {input_shape}: sides must be multiples of {SIDE_MULTIPLE} for the SAME "
            "padding to equal efficientnet_lite_pytorch's (see training/keras/efficientnet_lite.py)."
        )
    inputs = keras.Input(shape=input_shape, dtype="float32", name="input")
    x = layers.Conv2D(
        STEM_CHANNELS,
        3,
        strides=2,
        padding="same",
        use_bias=False,
        data_format=DATA_FORMAT,
        name=keras_name("_conv_stem"),
    )(inputs)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=keras_name("_bn0"))(x)
    x = _relu6("stem_relu6")(x)

    total = sum(stage[0] for stage in LITE0_STAGES)
    index = 0
    for repeats, kernel, stride, expand, _, filters in LITE0_STAGES:
        for repeat in range(repeats):
            drop_rate = DROP_CONNECT_RATE * index / total  # EfficientNet.extract_features' schedule
            x = _mbconv(x, index, kernel, stride if repeat == 0 else 1, expand, filters, drop_rate)
            index += 1

    x = _conv_bn(x, "_conv_head", "_bn1", HEAD_CHANNELS)
    x = _relu6("head_relu6")(x)
    x = layers.GlobalAveragePooling2D(data_format=DATA_FORMAT, name="avg_pooling")(x)
    if include_top:
        x = layers.Dropout(DROPOUT_RATE, name="dropout")(x)
        x = layers.Dense(num_classes, name=keras_name(_HEAD_PREFIX))(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")

    if weights_npz is not None:
        tensors = read_ported_weights(weights_npz)
        head = tensors.get(f"{_HEAD_PREFIX}.weight")
        # Transfer learning: the file's head (ImageNet's 1000 classes) does not fit this one.
        other_head = head is not None and head.shape[1:] == (HEAD_CHANNELS,) and head.shape[0] != num_classes
        load_ported_weights(model, tensors, backbone_only=not include_top or other_head)
    return model


def read_ported_weights(npz: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a :mod:`training.keras.port_weights` file, by PyTorch name."""
    with np.load(npz, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _keras_arrays(
    layer: layers.Layer, prefix: str, tensors: Mapping[str, np.ndarray], used: set[str]
) -> list[np.ndarray]:
    """The PyTorch tensors of ``prefix``, in ``layer``'s weight order and layout (names -> ``used``)."""

    def get(suffix: str) -> np.ndarray:
        name = f"{prefix}.{suffix}"
        if name not in tensors:
            raise ValueError(f"Keras layer {layer.name!r} needs {name!r}, which the weights file lacks.")
        used.add(name)
        return np.asarray(tensors[name], dtype=np.float32)

    # DepthwiseConv2D is not a Conv2D subclass in Keras 3; checked first all the same.
    if isinstance(layer, layers.DepthwiseConv2D):
        return [get("weight").transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, layers.Conv2D):
        return [get("weight").transpose(2, 3, 1, 0)]  # OIHW -> HWIO
    if isinstance(layer, layers.BatchNormalization):
        return [get("weight"), get("bias"), get("running_mean"), get("running_var")]
    if isinstance(layer, layers.Dense):
        return [get("weight").T, get("bias")]  # (out, in) -> (in, out)
    raise TypeError(f"No PyTorch counterpart known for the weights of {type(layer).__name__} {layer.name!r}.")


def load_ported_weights(
    model: keras.Model, npz: str | Path | Mapping[str, np.ndarray], *, backbone_only: bool = False
) -> None:
    """Set every weight of ``model`` from the ported PyTorch tensors, strictly.

    Each weighted layer's tensors are found by :func:`torch_name`, transposed to Keras's layout and
    shape-checked. Fails, naming them, if any tensor of the file is left unused or any Keras weight
    is left unset: a partial load would give a model that runs and is silently wrong.

    Args:
        model: A model from :func:`build_efficientnet_lite0`.
        npz: The ``.npz`` path, or its arrays (:func:`read_ported_weights`).
        backbone_only: Leave the classifier out: the file's ``_fc.*`` tensors are not used and the
            model's ``fc`` (if it has one) keeps its initialisation. Everything else stays strict.

    Raises:
        ValueError: missing, unused or mis-shaped tensors, or unset weights.
        TypeError: a weighted layer of a kind this port does not know.
    """
    tensors = read_ported_weights(npz) if isinstance(npz, (str, Path)) else dict(npz)
    skipped = {name for name in tensors if name.startswith(f"{_HEAD_PREFIX}.")} if backbone_only else set()
    used: set[str] = set()
    loaded: set[int] = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = torch_name(layer.name)
        if backbone_only and prefix == _HEAD_PREFIX:
            continue
        arrays = _keras_arrays(layer, prefix, tensors, used)
        expected = [tuple(weight.shape) for weight in layer.weights]
        if [array.shape for array in arrays] != expected:
            raise ValueError(
                f"Keras layer {layer.name!r} has weights of shapes {expected}; {prefix!r} gives "
                f"{[array.shape for array in arrays]} after the layout change."
            )
        layer.set_weights(arrays)
        loaded.update(id(weight) for weight in layer.weights)
    unused = sorted(set(tensors) - used - skipped)
    if unused:
        raise ValueError(f"{len(unused)} PyTorch tensors have no Keras layer: {unused[:8]}")
    fresh = {
        id(weight)
        for layer in model.layers
        if backbone_only and layer.name == keras_name(_HEAD_PREFIX)
        for weight in layer.weights
    }
    unset = [weight.path for weight in model.weights if id(weight) not in loaded | fresh]
    if unset:
        raise ValueError(f"{len(unset)} Keras weights were not set from the file: {unset[:8]}")
