"""ResNet, VGG, DenseNet and MobileNet, defined here with torchvision's names.

torchvision (and therefore timm) cannot be installed on the build machines,
but users may own torchvision ``state_dict`` files (e.g. ImageNet weights
copied in by hand). Every module and parameter here is named and shaped as
in torchvision, so such a file loads with ``load_state_dict(strict=True)``;
:func:`training.model.models.build_model` does that when given ``weights_path``.
Nothing is downloaded, and no pretrained weights for these families are in
``../shared/data``: built without a file they start from random weights.

Each network is a :class:`StagedNet`: its ``forward`` *is*
``classify(embed(blocks(stem(x))))``, and it names those parts, so the
staged trainer (``training/model/train.py``) can freeze the stem and the first
``cut`` blocks, cache their output once, and train the rest. Because
``forward`` is built from the same parts, a model trained through the staged
view exports to ONNX through its ordinary ``forward`` with no drift.

The families are parameterised rather than copied (ResNet-18/50 differ only
in block type and depth; VGG-11/16 only in convolutions per stage).

Why one module over 500 lines: the four families share :class:`StagedNet` and
the torchvision naming helpers, and each is short. One module per family is the
natural seam if a fifth family is added (issue 13).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "VGG",
    "Architecture",
    "DenseNet",
    "MobileNetV2",
    "MobileNetV3",
    "ResNet",
    "StagedNet",
]


class StagedNet(nn.Module):
    """A classifier that declares where it can be cut for staged fine-tuning.

    Subclasses split themselves into ``stem`` (always frozen), an ordered list
    of ``blocks`` (the first ``cut`` are frozen), ``embed`` (after the last
    block, up to the pooled feature vector, always trained) and ``classify``
    (dropout + the final linear layer). ``forward`` composes exactly those
    parts, so the split cannot disagree with the network that is exported.
    """

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> activation entering block 0 (identity unless overridden)."""
        return x

    def blocks(self) -> list[nn.Module]:
        """The cut points, in order: ``cut = k`` freezes ``blocks()[:k]``."""
        raise NotImplementedError

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> pooled embedding ``(B, D)``."""
        raise NotImplementedError

    def head_modules(self) -> list[nn.Module]:
        """Modules with parameters that ``embed`` runs (trained at every cut)."""
        raise NotImplementedError

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Embedding -> logits (dropout, then the final linear layer)."""
        raise NotImplementedError

    def final_linear(self) -> nn.Linear:
        """The layer whose output size is the class count (replaced for new classes)."""
        raise NotImplementedError

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename keys of older torchvision files to today's names (default: none)."""
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks():
            h = block(h)
        return self.classify(self.embed(h))


def _init_weights(model: nn.Module, conv_mode: str = "fan_out", linear_std: float | None = 0.01) -> None:
    """torchvision's initialisation: He-normal convolutions, unit BatchNorm, small linear layers.

    Only matters when no weights file is given; it keeps a randomly started
    model trainable (the default ``nn.Conv2d`` init is tuned for neither ReLU
    nor deep residual stacks).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def _conv_bn_act(
    cin: int,
    cout: int,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: Callable[..., nn.Module] | None = nn.ReLU6,
    norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: keys ``.0`` (conv, no bias) and ``.1`` (norm)."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), norm(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never down by more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# -- ResNet ------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """torchvision's ``BasicBlock`` (two 3x3) or ``Bottleneck`` (1x1-3x3-1x1, stride on the 3x3).

    One class for both, so ResNet-18 and ResNet-50 share every line; the
    parameter names (``conv1``/``bn1`` ... ``downsample.0``/``.1``) are the
    ones torchvision's files use.
    """

    def __init__(self, inplanes: int, planes: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        out = planes * (4 if bottleneck else 1)
        if bottleneck:
            convs = [(inplanes, planes, 1, 1), (planes, planes, 3, stride), (planes, out, 1, 1)]
        else:
            convs = [(inplanes, planes, 3, stride), (planes, out, 3, 1)]
        for i, (cin, cout, kernel, s) in enumerate(convs, 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel, s, kernel // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
        self.depth = len(convs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(1, self.depth + 1):
            h = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h))
            if i < self.depth:
                h = self.relu(h)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(h + identity)


class ResNet(StagedNet):
    """ResNet v1.5 (torchvision layout); blocks are the residual blocks of ``layer1..4``.

    Args:
        layers: Residual blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        bottleneck: Bottleneck blocks (ResNet-50 and deeper) instead of basic ones.
        num_classes: Outputs of ``fc``.
    """

    def __init__(self, layers: Sequence[int], bottleneck: bool, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for stage, (depth, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True), 1):
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.append(ResidualBlock(inplanes, planes, stride, bottleneck))
                inplanes = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self, linear_std=None)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def blocks(self) -> list[nn.Module]:
        return [block for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for block in stage]

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(h), 1)

    def head_modules(self) -> list[nn.Module]:
        return []

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def final_linear(self) -> nn.Linear:
        return self.fc


# -- VGG ---------------------------------------------------------------------------------------


class VGG(StagedNet):
    """VGG with BatchNorm (torchvision layout); blocks are the five conv stages.

    The classifier keeps torchvision's 25088-4096-4096 MLP so ImageNet files
    load strictly; it holds ~90 % of the parameters. ``avgpool`` resizes the
    last feature map to 7x7 as in torchvision: any input size runs in
    PyTorch, but the ONNX exporter only handles sizes whose feature map
    divides into 7 (224, 448, ... px).

    Args:
        convs_per_stage: 3x3 convolutions per stage, e.g. ``(1, 1, 2, 2, 2)`` for VGG-11.
        num_classes: Outputs of the last linear layer.
    """

    def __init__(self, convs_per_stage: Sequence[int], num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self._stage_ends: list[int] = []
        cin = 3
        for count, width in zip(convs_per_stage, (64, 128, 256, 512, 512), strict=True):
            for _ in range(count):
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                cin = width
            layers.append(nn.MaxPool2d(2, 2))
            self._stage_ends.append(len(layers))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )
        _init_weights(self)

    def blocks(self) -> list[nn.Module]:
        starts = [0, *self._stage_ends[:-1]]
        return [self.features[a:b] for a, b in zip(starts, self._stage_ends, strict=True)]

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier[:5](torch.flatten(self.avgpool(h), 1))

    def head_modules(self) -> list[nn.Module]:
        return [self.classifier[0], self.classifier[3]]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier[5:](features)

    def final_linear(self) -> nn.Linear:
        return self.classifier[6]


# -- DenseNet ----------------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1-BN-ReLU-3x3; returns its input with the new features appended.

    torchvision's layer returns only the new features and its block does the
    concatenation; appending here instead gives the same tensors and lets
    each layer be a cut point of its own.
    """

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, new], 1)


# Keys such as "denselayer1.norm.1.weight" in the files torchvision publishes (from before
# module names could not contain dots) mean "denselayer1.norm1.weight" today.
_OLD_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class DenseNet(StagedNet):
    """DenseNet-BC (torchvision layout); blocks are single dense layers and transitions.

    Args:
        block_config: Dense layers per block, ``(6, 12, 24, 16)`` for DenseNet-121.
        growth: Channels each dense layer adds.
        init_features: Channels of the stem convolution.
        bn_size: Bottleneck width factor of the 1x1 convolutions.
        num_classes: Outputs of ``classifier``.
    """

    def __init__(
        self,
        block_config: Sequence[int] = (6, 12, 24, 16),
        growth: int = 32,
        init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        parts: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(3, init_features, 7, 2, 3, bias=False),
            norm0=nn.BatchNorm2d(init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, 2, 1),
        )
        channels = init_features
        for i, count in enumerate(block_config, 1):
            layers = OrderedDict()
            for j in range(count):
                layers[f"denselayer{j + 1}"] = _DenseLayer(channels + j * growth, growth, bn_size)
            parts[f"denseblock{i}"] = nn.Sequential(layers)
            channels += count * growth
            if i < len(block_config):
                parts[f"transition{i}"] = nn.Sequential(
                    OrderedDict(
                        norm=nn.BatchNorm2d(channels),
                        relu=nn.ReLU(inplace=True),
                        conv=nn.Conv2d(channels, channels // 2, 1, bias=False),
                        pool=nn.AvgPool2d(2, 2),
                    )
                )
                channels //= 2
        parts["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(parts)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self, conv_mode="fan_in", linear_std=None)
        nn.init.zeros_(self.classifier.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[:4](x)

    def blocks(self) -> list[nn.Module]:
        out: list[nn.Module] = []
        for name, module in list(self.features.named_children())[4:-1]:
            out.extend(module.children() if name.startswith("denseblock") else [module])
        return out

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features.norm5(h)), 1), 1)

    def head_modules(self) -> list[nn.Module]:
        return [self.features.norm5]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def final_linear(self) -> nn.Linear:
        return self.classifier

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            match = _OLD_DENSE_KEY.match(key)
            out[match.group(1) + match.group(2) if match else key] = value
        return out


# -- MobileNet v2 / v3 -------------------------------------------------------------------------


class _InvertedResidualV2(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project (keys ``conv.N``)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_act(cin, hidden, 1)]
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class _SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with MobileNetV3's hard-sigmoid gate."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return F.hardsigmoid(scale) * x


# MobileNetV3 uses TF's BatchNorm settings; they matter when statistics are re-estimated.
_BN_V3 = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class _InvertedResidualV3(nn.Module):
    """MobileNetV3 block: optional expand, depthwise, optional SE, project (keys ``block.N``)."""

    def __init__(
        self, cin: int, kernel: int, hidden: int, cout: int, se: bool, hardswish: bool, stride: int
    ) -> None:
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(_conv_bn_act(cin, hidden, 1, act=act, norm=_BN_V3))
        layers.append(_conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=act, norm=_BN_V3))
        if se:
            layers.append(_SqueezeExcitation(hidden, _make_divisible(hidden // 4)))
        layers.append(_conv_bn_act(hidden, cout, 1, act=None, norm=_BN_V3))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res_connect else out


class _FeatureNet(StagedNet):
    """torchvision's ``features -> pool -> classifier`` MobileNet layout.

    ``features[0]`` is the stem, ``features[1:-1]`` the blocks, ``features[-1]``
    the last 1x1 convolution; the first ``_embed_layers`` entries of
    ``classifier`` belong to the embedding, the rest (dropout + linear) to
    ``classify``.
    """

    _embed_layers = 0
    features: nn.Sequential
    classifier: nn.Sequential

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[0](x)

    def blocks(self) -> list[nn.Module]:
        return list(self.features[1:-1])

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.features[-1](h), 1), 1)
        return self.classifier[: self._embed_layers](pooled)

    def head_modules(self) -> list[nn.Module]:
        return [self.features[-1], *self.classifier[: self._embed_layers]]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier[self._embed_layers :](features)

    def final_linear(self) -> nn.Linear:
        return self.classifier[-1]


# (expansion, channels, repeats, first stride) per stage, as in the MobileNetV2 paper.
_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(_FeatureNet):
    """MobileNetV2, width 1.0 (torchvision layout); blocks are the 17 inverted residuals."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 32, 3, 2)]
        cin = 32
        for expand, cout, repeats, stride in _V2_STAGES:
            for i in range(repeats):
                layers.append(_InvertedResidualV2(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn_act(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        _init_weights(self)


# (kernel, expanded, out, squeeze-excite, hard-swish, stride) per block of MobileNetV3-Small.
_V3_SMALL = (
    (3, 16, 16, True, False, 2),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
)


class MobileNetV3(_FeatureNet):
    """MobileNetV3 (torchvision layout); blocks are the inverted residuals.

    Args:
        config: Block table (:data:`_V3_SMALL` for the Small variant).
        last_channel: Width of the hidden classifier layer (1024 for Small).
        num_classes: Outputs of the last linear layer.
        stem_width: Channels of the stem convolution.
    """

    _embed_layers = 2  # Linear + Hardswish: the 1024-d embedding the final layer reads

    def __init__(
        self,
        config: Sequence[tuple[int, int, int, bool, bool, int]] = _V3_SMALL,
        last_channel: int = 1024,
        num_classes: int = 1000,
        stem_width: int = 16,
    ) -> None:
        super().__init__()
        cin = stem_width
        layers: list[nn.Module] = [_conv_bn_act(3, cin, 3, 2, act=nn.Hardswish, norm=_BN_V3)]
        for kernel, hidden, cout, se, hardswish, stride in config:
            layers.append(_InvertedResidualV3(cin, kernel, hidden, cout, se, hardswish, stride))
            cin = cout
        layers.append(_conv_bn_act(cin, 6 * cin, 1, act=nn.Hardswish, norm=_BN_V3))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * cin, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(0.2, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        _init_weights(self)


# -- the table the registry reads --------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """One buildable network for :mod:`training.model.models`.

    Attributes:
        factory: ``factory(num_classes=n)`` -> a :class:`StagedNet` with random weights.
        default_cut: First trainable block: the stem and early stages stay
            frozen (and are evaluated once), the last stage(s) and the head train.
        description: One line for ``--help``.
    """

    factory: Callable[..., StagedNet]
    default_cut: int
    description: str


ARCHITECTURES: Mapping[str, Architecture] = {
    "resnet18": Architecture(
        partial(ResNet, (2, 2, 2, 2), False), 6, "ResNet-18 (11.2 M params, trains layer4 + fc)"
    ),
    "resnet50": Architecture(
        partial(ResNet, (3, 4, 6, 3), True), 13, "ResNet-50 (23.5 M params, trains layer4 + fc)"
    ),
    "vgg11_bn": Architecture(
        partial(VGG, (1, 1, 2, 2, 2)), 4, "VGG-11 with BatchNorm (128.8 M params, trains conv stage 5 + MLP)"
    ),
    "vgg16_bn": Architecture(
        partial(VGG, (2, 2, 3, 3, 3)), 4, "VGG-16 with BatchNorm (134.3 M params, trains conv stage 5 + MLP)"
    ),
    "densenet121": Architecture(
        partial(DenseNet, (6, 12, 24, 16)),
        6 + 1 + 12 + 1 + 24 + 1,
        "DenseNet-121 (7.0 M params, trains denseblock4 + norm5 + classifier)",
    ),
    "mobilenet_v2": Architecture(
        MobileNetV2, 10, "MobileNetV2 (2.2 M params, trains the 96/160/320-channel stages + head)"
    ),
    "mobilenet_v3_small": Architecture(
        partial(MobileNetV3, _V3_SMALL, 1024),
        6,
        "MobileNetV3-Small (1.5 M params, trains the 48/96-channel stages + head)",
    ),
}
