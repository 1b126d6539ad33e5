"""Model registry: one name -> one builder, plus how to cut the network for fine-tuning.

Training on two CPU cores is only practical if the frozen front of the
network runs once per image. Each registered architecture therefore comes
with a :class:`StagedModel` view that splits the network at a *cut*: the
``prefix`` (frozen, evaluated once and cached), the ``features`` part
(trainable blocks up to the pooled embedding) and the ``classifier``.

Registered: EfficientNet-Lite0 (``efficientnet_lite_pytorch``; the only one
with ImageNet weights on the build machines) and the torchvision-compatible
ResNet, VGG, DenseNet and MobileNet families of
:mod:`training.model.architectures`, which declare their own cut points and are
viewed through :class:`BlockStages`. Every builder accepts a local weights
file (:func:`load_weights_file`); nothing is ever downloaded. Adding a
network means writing it as a :class:`~training.model.architectures.StagedNet`
and listing it in ``ARCHITECTURES``; nothing else in ``training/`` changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..run_files import CALIBRATION_NAME
from .architectures import ARCHITECTURES, Architecture, StagedNet

__all__ = [
    "CALIBRATION_NAME",
    "CAM_NAME",
    "FEATURES_NAME",
    "BlockStages",
    "ClassActivationModel",
    "EfficientNetStages",
    "ModelEntry",
    "ProbabilityModel",
    "StagedModel",
    "apply_temperature",
    "available_models",
    "build_model",
    "describe_models",
    "load_weights_file",
    "predict_logits",
    "predict_torch",
    "read_temperature",
    "register_model",
    "stage_taps",
    "staged_view",
    "supports_cam",
]


class StagedModel(Protocol):
    """A network viewed as ``prefix(cut) -> features(cut) -> classifier``.

    ``cut`` counts the network's repeated blocks: with ``cut = k`` the first
    ``k`` blocks (and the stem) are frozen and blocks ``k..`` are trained.
    ``cut = num_blocks`` trains only the head convolution and the classifier
    when the architecture has one, ``prefix(x, num_blocks)`` followed by
    ``features`` then equals the frozen backbone's embedding.
    """

    model: nn.Module

    @property
    def num_blocks(self) -> int:
        """Number of cut points after the stem."""
        ...

    def prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """Input batch -> activation entering block ``cut`` (the frozen part)."""
        ...

    def features(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        """Activation entering block ``cut`` -> pooled embedding ``(B, D)``."""
        ...

    def classifier(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled embedding -> logits (dropout included in train mode)."""
        ...

    def trainable_modules(self, cut: int) -> list[nn.Module]:
        """The modules ``features`` runs for this cut (excluding the classifier)."""
        ...

    def classifier_module(self) -> nn.Module:
        """The final linear layer (trained in every stage)."""
        ...


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture.

    Attributes:
        name: Registry key, e.g. ``efficientnet-lite0``.
        builder: ``(num_classes, weights_path) -> nn.Module``; ``weights_path``
            None means random initialisation (never a download).
        staged: Wraps a built model in its :class:`StagedModel` view.
        description: One line for ``--help``.
        default_cut: A sensible first trainable block for CPU fine-tuning.
    """

    name: str
    builder: Callable[[int, Path | None], nn.Module]
    staged: Callable[[nn.Module], StagedModel]
    description: str
    default_cut: int


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> None:
    """Add (or replace) an architecture in the registry."""
    _REGISTRY[entry.name] = entry


def available_models() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def describe_models() -> dict[str, str]:
    """Registered name -> one-line description, sorted by name (for ``--help``)."""
    return {name: _REGISTRY[name].description for name in available_models()}


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}; registered models: {', '.join(available_models())}."
        ) from None


def build_model(name: str, num_classes: int = 2, weights_path: str | Path | None = None) -> nn.Module:
    """Build a registered architecture with ``num_classes`` outputs.

    The model takes the shared preprocessing's ``(N, 3, H, W)`` float tensor
    and returns logits.

    Args:
        name: Registry key (see :func:`available_models`).
        num_classes: Outputs of the final layer.
        weights_path: A local ``state_dict`` file in the architecture's own
            naming (torchvision's for ResNet/VGG/DenseNet/MobileNet,
            efficientnet_pytorch's for EfficientNet). Every tensor is loaded;
            if the file's final layer has another class count (ImageNet's
            1000) that layer is left freshly initialised instead. None gives
            random weights. Nothing is ever downloaded: the edge build
            machines have no route to model hubs.

    Raises:
        ValueError: unknown name, or a weights file that does not fit the
            architecture (the message names the file and the first offending keys).
        FileNotFoundError: ``weights_path`` given but missing.
    """
    entry = _entry(name)
    path = Path(weights_path) if weights_path is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"Pretrained weights {path} not found for model {name!r}.")
    return entry.builder(num_classes, path)


def staged_view(name: str, model: nn.Module) -> StagedModel:
    """The :class:`StagedModel` view of a model built by :func:`build_model`."""
    return _entry(name).staged(model)


def default_cut(name: str) -> int:
    """The registry's suggested first trainable block for ``name``."""
    return _entry(name).default_cut


# -- local weights files ----------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``state_dict`` file, unwrapped from common containers.

    Accepts a bare ``state_dict`` (torchvision's release files), a dict
    holding one under ``state_dict`` or ``model`` (this package's
    ``checkpoint.pt`` and many training scripts), and strips the
    ``module.`` prefix ``nn.DataParallel`` adds.
    """
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean "not a weights file"
        raise ValueError(f"Weights file {path} cannot be read as a PyTorch state_dict: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"Weights file {path} does not hold a state_dict (a mapping of names to tensors); "
            f"found {type(obj).__name__}."
        )
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _examples(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_weights_file(
    model: nn.Module,
    path: Path,
    head: nn.Linear,
    name: str,
    upgrade: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Load a local ``state_dict`` file into ``model`` strictly, replacing the head if needed.

    Every key must exist in both with the same shape, with one exception:
    when the file's final layer (``head``) has another number of outputs,
    e.g. ImageNet's 1000 against our 2 classes, that layer keeps the model's
    fresh initialisation. The comparison is done before loading so the
    error can name the file and the keys at fault instead of torch's long
    generic message; the load itself is ``strict=True``.

    Args:
        model: The freshly built network.
        path: The weights file.
        head: The model's final linear layer.
        name: Registry name, for messages.
        upgrade: Renames keys of older file layouts (e.g. DenseNet's ``norm.1``).

    Raises:
        ValueError: unreadable file, or keys/shapes that do not fit the model.
    """
    state = _read_state_dict(path)
    if upgrade is not None:
        state = upgrade(state)
    own = model.state_dict()
    prefix = next(n for n, m in model.named_modules() if m is head)
    head_keys = [f"{prefix}.weight", f"{prefix}.bias"]
    file_head = state.get(head_keys[0])
    if (
        file_head is not None
        and file_head.shape[1:] == own[head_keys[0]].shape[1:]
        and file_head.shape[0] != own[head_keys[0]].shape[0]
    ):
        state.update({k: own[k] for k in head_keys})  # new classes: keep the fresh head
    # BatchNorm fills in num_batches_tracked when an (older) file lacks it.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{label}: {_examples(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape file/model", wrong))
            if keys
        ]
        raise ValueError(
            f"Weights file {path} does not fit model {name!r} ({'; '.join(problems)}). "
            "Is it a state_dict of this architecture?"
        )
    model.load_state_dict(state, strict=True)


# -- torchvision-compatible families (training.model.architectures) ---------------------------------


def _build_architecture(
    arch: Architecture, name: str, num_classes: int, weights_path: Path | None
) -> nn.Module:
    model = arch.factory(num_classes=num_classes)
    if weights_path is not None:
        load_weights_file(model, weights_path, model.final_linear(), name, model.upgrade_state_dict)
    return model


class BlockStages:
    """:class:`StagedModel` for any :class:`~training.model.architectures.StagedNet`.

    The network declares its stem, blocks, embedding and classifier; this
    view only slices the block list at ``cut``. Since the network's
    ``forward`` is the same composition, the staged path and the exported
    path compute the same function.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, StagedNet):
            raise TypeError(f"BlockStages needs a StagedNet, got {type(model).__name__}.")
        self.model: StagedNet = model
        self._blocks = model.blocks()

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def _check(self, cut: int) -> None:
        if not 0 <= cut <= self.num_blocks:
            raise ValueError(f"cut must be in [0, {self.num_blocks}], got {cut}.")

    def prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        self._check(cut)
        h = self.model.stem(x)
        for block in self._blocks[:cut]:
            h = block(h)
        return h

    def features(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        self._check(cut)
        for block in self._blocks[cut:]:
            h = block(h)
        return self.model.embed(h)

    def classifier(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.classify(features)

    def trainable_modules(self, cut: int) -> list[nn.Module]:
        self._check(cut)
        return [*self._blocks[cut:], *self.model.head_modules()]

    def classifier_module(self) -> nn.Module:
        return self.model.final_linear()


for _name, _arch in ARCHITECTURES.items():
    register_model(
        ModelEntry(
            name=_name,
            builder=partial(_build_architecture, _arch, _name),
            staged=BlockStages,
            description=_arch.description,
            default_cut=_arch.default_cut,
        )
    )


# -- EfficientNet-Lite (efficientnet_lite_pytorch) --------------------------------------------


def _build_efficientnet_lite0(num_classes: int, weights_path: Path | None) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # from_name + our loader does what EfficientNet.from_pretrained does for a local file
    # (same initialisation, every tensor but a mismatched _fc), but never falls back to a
    # download, keeps a matching _fc (e.g. a 2-class checkpoint) and names the file on error.
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if weights_path is not None:
        load_weights_file(model, weights_path, model._fc, "efficientnet-lite0")
    return model


class EfficientNetStages:
    """:class:`StagedModel` for ``efficientnet_lite_pytorch.EfficientNet``.

    Mirrors ``EfficientNet.extract_features``/``forward`` exactly (including
    the per-block drop-connect rate), split at a block index, so a model
    fine-tuned through this view exports through the library's own
    ``forward`` unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def num_blocks(self) -> int:
        return len(self.model._blocks)

    def _check(self, cut: int) -> None:
        if not 0 <= cut <= self.num_blocks:
            raise ValueError(f"cut must be in [0, {self.num_blocks}], got {cut}.")

    def _run_blocks(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        m = self.model
        rate = m._global_params.drop_connect_rate
        for idx in range(start, stop):
            block_rate = rate * float(idx) / len(m._blocks) if rate else rate
            h = m._blocks[idx](h, drop_connect_rate=block_rate)
        return h

    def prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        self._check(cut)
        m = self.model
        h = m._swish(m._bn0(m._conv_stem(x)))
        return self._run_blocks(h, 0, cut)

    def features(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        self._check(cut)
        m = self.model
        h = self._run_blocks(h, cut, self.num_blocks)
        h = m._swish(m._bn1(m._conv_head(h)))
        return torch.flatten(m._avg_pooling(h), 1)

    def classifier(self, features: torch.Tensor) -> torch.Tensor:
        return self.model._fc(self.model._dropout(features))

    def trainable_modules(self, cut: int) -> list[nn.Module]:
        self._check(cut)
        m = self.model
        return [*list(m._blocks)[cut:], m._conv_head, m._bn1]

    def classifier_module(self) -> nn.Module:
        return self.model._fc

    def blocks(self) -> Iterator[nn.Module]:
        """The repeated blocks, in order (for logging shapes)."""
        return iter(self.model._blocks)


register_model(
    ModelEntry(
        name="efficientnet-lite0",
        builder=_build_efficientnet_lite0,
        staged=EfficientNetStages,
        description="EfficientNet-Lite0 (4.7 M params, ReLU6, no SE; quantizes well to INT8)",
        default_cut=8,
    )
)


class ProbabilityModel(nn.Module):
    """Wraps a logits model so an exported graph (ONNX or TFLite) ends in a softmax over classes,
    and the edge needs no knowledge of logits.

    With ``features=True`` it returns ``(probabilities, features)``: the pooled stage-end
    activations of :func:`stage_taps` (for the families without a class-activation map).
    """

    def __init__(self, model: nn.Module, features: bool = False) -> None:
        super().__init__()
        self.model = model
        self._taps = stage_taps(model) if features else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._taps is None:
            return torch.softmax(self.model(x), dim=1)
        final, maps = self._taps.run(x)
        features = _pooled_concat(maps)
        probabilities = torch.softmax(self._taps.head(final), dim=1)
        return probabilities, features


#: The exported graph's third output: pooled activations at the end of each stage (the
#: out-of-distribution check's input, ``manifest.output.features``).
FEATURES_NAME = "features"


@dataclass(frozen=True)
class StageTaps:
    """A network run that also hands out the feature maps its out-of-distribution check reads.

    ``run(x)`` returns ``(final, maps)``: ``final`` is the last convolutional feature map (what
    the network global-average-pools; ``head(final) == model(x)``, the logits, computed with the
    network's own operators) and ``maps`` the outputs of the blocks named in ``layers``, whose
    pooled widths are ``dims``.
    """

    run: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]
    head: Callable[[torch.Tensor], torch.Tensor]
    layers: tuple[str, ...]
    dims: tuple[int, ...]


def _pooled_concat(maps: list[torch.Tensor]) -> torch.Tensor:
    """``[batch, sum(channels)]``: each map's global average, concatenated in order."""
    return torch.cat([torch.flatten(torch.nn.functional.adaptive_avg_pool2d(m, 1), 1) for m in maps], dim=1)


def _stage_ends(shapes: list[tuple[int, ...]]) -> list[int]:
    """Indices of the last block of each run of two or more blocks with the same output shape.

    A *stage* is a run of blocks that keep their output shape (channels and grid); its last
    block's output is what the next stage reads. Single-block stages are left out (the first
    block of a stage changes the shape, so it is a transition, not a settled representation).
    EfficientNet-Lite0: blocks 2, 4, 7, 10 and 14 (widths 24, 40, 80, 112, 192).
    """
    ends: list[int] = []
    start = 0
    for i in range(1, len(shapes) + 1):
        if i == len(shapes) or shapes[i] != shapes[start]:
            if i - start >= 2:
                ends.append(i - 1)
            start = i
    return ends


def stage_taps(model: nn.Module, sample_shape: tuple[int, int, int] = (3, 96, 96)) -> StageTaps:
    """Where the features output taps ``model`` (see :class:`StageTaps` and :func:`_stage_ends`).

    EfficientNet-Lite and the :class:`~training.model.architectures.StagedNet` families tap
    the end of each multi-block stage; a family whose blocks never repeat a shape (VGG's
    stages, DenseNet's growing dense layers) taps only its final pooled features
    (``layers == ("head",)``), recorded as such in the manifest. ``sample_shape`` is only
    the probe that finds the stages.
    """
    trunk: Callable[[torch.Tensor, frozenset[int]], tuple[torch.Tensor, list[torch.Tensor]]]
    if hasattr(model, "extract_features") and hasattr(model, "_fc"):  # EfficientNet-Lite
        split = _feature_split(model)
        assert split is not None
        blocks = list(model._blocks)
        rate = model._global_params.drop_connect_rate

        def efficientnet_trunk(
            x: torch.Tensor, taps: frozenset[int]
        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
            # extract_features, step for step (the same drop-connect schedule).
            h = model._swish(model._bn0(model._conv_stem(x)))
            maps: list[torch.Tensor] = []
            for idx, block in enumerate(blocks):
                block_rate = rate * float(idx) / len(blocks) if rate else rate
                h = block(h, drop_connect_rate=block_rate)
                if idx in taps:
                    maps.append(h)
            return model._swish(model._bn1(model._conv_head(h))), maps

        trunk, head, prefix = efficientnet_trunk, split[1], "_blocks"
    elif isinstance(model, StagedNet):
        staged = model
        blocks = list(staged.blocks())
        split = _feature_split(staged)
        last_conv = _staged_last_conv(staged) if split is not None else nn.Identity()

        def staged_trunk(x: torch.Tensor, taps: frozenset[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            h = staged.stem(x)
            maps: list[torch.Tensor] = []
            for idx, block in enumerate(blocks):
                h = block(h)
                if idx in taps:
                    maps.append(h)
            return last_conv(h), maps

        def staged_head(f: torch.Tensor) -> torch.Tensor:
            # no single linear head after pooling (VGG, MobileNetV3): the network's own parts
            return staged.classify(staged.embed(f))

        trunk, head, prefix = staged_trunk, (split[1] if split is not None else staged_head), "blocks"
    else:
        raise ValueError(f"{type(model).__name__}: no known stage structure to take features from")

    was_training = model.training
    model.eval()
    with torch.no_grad():
        probe = torch.zeros((1, *sample_shape))
        final, every = trunk(probe, frozenset(range(len(blocks))))
        shapes = [tuple(int(d) for d in m.shape[1:]) for m in every]
        pooled_width = int(final.shape[1])
    model.train(was_training)
    ends = frozenset(_stage_ends(shapes))
    if ends:

        def run(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            return trunk(x, ends)

        layers = tuple(f"{prefix}.{i}" for i in sorted(ends))
        dims = tuple(shapes[i][0] for i in sorted(ends))
        return StageTaps(run, head, layers, dims)

    def run_final(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # Fallback: the final convolutional map (pooled: the classifier's input where it is linear).
        final, _ = trunk(x, frozenset())
        return final, [final]

    return StageTaps(run_final, head, ("head",), (pooled_width,))


def _staged_last_conv(model: StagedNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step from a StagedNet's last block output to the map it pools (see _feature_split)."""
    name = type(model).__name__
    if name == "DenseNet":

        def last_conv(h: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.relu(model.features.norm5(h))

        return last_conv
    if name == "MobileNetV2":
        conv: Callable[[torch.Tensor], torch.Tensor] = model.features[-1]
        return conv
    return nn.Identity()


#: The exported graph's second output: per-class logit maps of the last convolutional features.
CAM_NAME = "cam"


def _feature_split(
    model: nn.Module,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], nn.Linear] | None:
    """``(features, head, classifier)`` with ``model(x) == head(features(x))``, or None.

    ``features`` is the last convolutional feature map, the tensor the network
    global-average-pools; ``head`` pools it and applies the classifier with
    the very operators the network's own ``forward`` uses (so the exported
    probabilities do not change by a bit). None where the classifier after
    pooling is not one linear layer (VGG's and MobileNetV3's MLPs): there a
    class-activation map is not a decomposition of the logits.
    """
    if hasattr(model, "extract_features") and hasattr(model, "_fc"):  # EfficientNet-Lite

        def head(f: torch.Tensor) -> torch.Tensor:
            pooled = model._avg_pooling(f).view(f.size(0), -1)
            return model._fc(model._dropout(pooled))

        return model.extract_features, head, model._fc
    if not isinstance(model, StagedNet):
        return None
    linear = model.final_linear()
    name = type(model).__name__
    last_conv: Callable[[torch.Tensor], torch.Tensor]
    if name == "ResNet":
        last_conv = nn.Identity()
    elif name == "DenseNet":

        def last_conv(h: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.relu(model.features.norm5(h))

    elif name == "MobileNetV2":
        last_conv = model.features[-1]
    else:
        return None

    def features(x: torch.Tensor) -> torch.Tensor:
        h = model.stem(x)
        for block in model.blocks():
            h = block(h)
        return last_conv(h)

    def pooled_head(f: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(f, 1), 1)
        return model.classify(pooled)

    return features, pooled_head, linear


def supports_cam(model: nn.Module) -> bool:
    """Whether :class:`ClassActivationModel` can wrap ``model`` (one linear layer after pooling)."""
    return _feature_split(model) is not None


class ClassActivationModel(nn.Module):
    """The export wrapper with a heat-map: ``x -> (probabilities, cam)``, one trunk pass.

    ``cam[n, k] = W[k] . F[n, :, i, j] + b[k]`` for the last convolutional
    features ``F`` (before global pooling) and the final linear layer
    ``(W, b)`` (Zhou et al., CVPR 2016, "class activation mapping"), as a
    1x1 convolution inside the graph: the device gets the map from the same
    inference run, with no gradients. Since pooling is a mean and the head is
    linear, ``mean_ij cam[n, k] == logits[n, k]``, the logits the softmax reads
    (with the temperature folded into ``(W, b)``, they are the calibrated
    logits, i.e. raw logits / T). Probabilities come from the network's own
    pooling and classifier on the same ``F``, unchanged. With ``features=True`` a third output,
    the pooled stage ends of :func:`stage_taps` (``[batch, sum(dims)]``), comes from the same pass.
    """

    def __init__(self, model: nn.Module, features: bool = False) -> None:
        super().__init__()
        split = _feature_split(model)
        if split is None:
            raise ValueError(
                f"{type(model).__name__} has no single linear classifier after global pooling: "
                "a class-activation map does not decompose its logits"
            )
        self.model = model
        self._features, self._head, self._linear = split
        self._taps = stage_taps(model) if features else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._taps is None:
            f = self._features(x)
        else:
            f, maps = self._taps.run(x)
            # The pooled stage ends (the out-of-distribution check's input), from the same pass.
            pooled = _pooled_concat(maps)
        # The map first, so the exported graph still ends in the softmax (as without the map).
        weight = self._linear.weight[:, :, None, None]
        cam = torch.nn.functional.conv2d(f, weight, self._linear.bias)
        probabilities = torch.softmax(self._head(f), dim=1)
        if self._taps is None:
            return probabilities, cam
        return probabilities, cam, pooled


def apply_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Fold temperature scaling into the network: the last ``nn.Linear`` is divided by ``temperature``.

    ``softmax((W x + b) / T) == softmax((W / T) x + b / T)``, so the folded
    model outputs calibrated probabilities with no extra operator, and every
    export route (ONNX and its INT8 model, whose classifier stays float, and
    TFLite) carries the same calibration. Every registered family ends in a
    linear classifier. Changes ``model`` in place and returns it.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no linear classifier to fold the temperature into")
    last = linears[-1]
    with torch.no_grad():
        last.weight.div_(temperature)
        if last.bias is not None:
            last.bias.div_(temperature)
    return model


def read_temperature(run_dir: str | Path) -> float:
    """The temperature the ``export`` stage fitted for a run (1.0 before calibration existed)."""
    path = Path(run_dir) / CALIBRATION_NAME
    if not path.is_file():
        return 1.0
    return float(json.loads(path.read_text(encoding="utf-8"))["temperature"])


@torch.inference_mode()
def predict_logits(model: nn.Module, samples: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``(N, classes)`` logits of a PyTorch model on NCHW input tensors."""
    model.eval()
    outs = [
        model(torch.from_numpy(samples[i : i + batch_size])).numpy()
        for i in range(0, len(samples), batch_size)
    ]
    return np.concatenate(outs)


@torch.inference_mode()
def predict_torch(model: nn.Module, samples: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``(N, classes)`` softmax probabilities of a PyTorch model on NCHW input tensors.

    The reference every export (ONNX, TFLite) is compared against.
    """
    model.eval()
    outs = [
        torch.softmax(model(torch.from_numpy(samples[i : i + batch_size])), dim=1).numpy()
        for i in range(0, len(samples), batch_size)
    ]
    return np.concatenate(outs)
