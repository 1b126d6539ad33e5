"""Model registry: one name -> one builder, plus how to cut the network for fine-tuning.

Training on two CPU cores is only practical if the frozen front of the
network runs once per image. Each registered architecture therefore comes
with a :class:`StagedModel` view that splits the network at a *cut*: the
``prefix`` (frozen, evaluated once and cached), the ``features`` part
(trainable blocks up to the pooled embedding) and the ``classifier``.

Only EfficientNet-Lite0 is registered now. Adding ResNet/VGG/DenseNet/
MobileNet later means writing a builder (torchvision cannot be installed
here, so the module is defined locally) and a :class:`StagedModel` for it,
then calling :func:`register_model`; nothing else in ``training/`` changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

__all__ = [
    "EfficientNetStages",
    "ModelEntry",
    "StagedModel",
    "available_models",
    "build_model",
    "register_model",
    "staged_view",
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


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}; registered models: {', '.join(available_models())}."
        ) from None


def build_model(name: str, num_classes: int, weights_path: str | Path | None = None) -> nn.Module:
    """Build a registered architecture with a fresh ``num_classes`` classifier.

    Args:
        name: Registry key (see :func:`available_models`).
        num_classes: Outputs of the new final layer.
        weights_path: Local pretrained (ImageNet) weights for the backbone;
            None gives random weights. Nothing is ever downloaded: the edge
            build machines have no route to model hubs.

    Raises:
        ValueError: unknown name.
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


# -- EfficientNet-Lite (efficientnet_lite_pytorch) --------------------------------------------


def _build_efficientnet_lite0(num_classes: int, weights_path: Path | None) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    if weights_path is None:
        return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    # The library only treats a str as a local path; anything else triggers a download.
    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(weights_path), num_classes=num_classes
    )


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
