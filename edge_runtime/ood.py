"""The out-of-distribution score: how unlike its training images a scan is, to the model.

The model computes, in the same run as its probabilities, the global average of the feature
map at the end of each of its stages (the ``features`` output, ``manifest.output.features``).
Per stage, the scan's distance to the training split is the Mahalanobis distance under a
shrinkage (Ledoit-Wolf) covariance fitted on the training split's INT8 features; its logarithm
is standardised with the training split's own mean and spread, and the stages' values are
summed (Lee et al., NeurIPS 2018, combine layers the same way). Early stages see intensity
and texture (an inverted or non-radiograph image), later ones anatomy and scale (an adult
chest, a hip), so no single layer has to catch everything.

Training fits the statistics (``training.evaluate.ood``) and writes them with :func:`save`;
the threshold is set on validation, never on the images the check must refuse. The edge and
training both score through :meth:`OodModel.score`, so what the model card reports is what a
box computes. Numpy only: the features are exact multiples of their quantization scale and
the arithmetic is float64, so every CPU gives the same verdict away from the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelBundleError

__all__ = ["LayerStats", "OodModel", "load", "save"]

#: Bounds the log of a zero distance (a scan identical to the training mean).
_TINY = 1e-12


@dataclass(frozen=True)
class LayerStats:
    """One stage's fitted statistics."""

    #: ``(d,)`` training mean of the pooled activations.
    mean: np.ndarray
    #: ``(d, d)`` inverse of the shrinkage covariance.
    precision: np.ndarray
    #: Mean and standard deviation of ``log(distance)`` over the training split.
    log_mean: float
    log_std: float

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def log_distances(self, features: np.ndarray) -> np.ndarray:
        """``log`` of the squared Mahalanobis distance of each row of ``(N, d)`` ``features``."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        squared = np.einsum("ij,jk,ik->i", centred, self.precision, centred)
        logs: np.ndarray = np.log(np.maximum(squared, _TINY))
        return logs

    def standardised(self, features: np.ndarray) -> np.ndarray:
        scaled: np.ndarray = (self.log_distances(features) - self.log_mean) / self.log_std
        return scaled


@dataclass(frozen=True)
class OodModel:
    """The fitted check: per-stage statistics, summed into one score per scan."""

    layers: tuple[LayerStats, ...]
    _mean: np.ndarray = field(init=False, repr=False, compare=False)
    _precision: np.ndarray = field(init=False, repr=False, compare=False)
    _starts: np.ndarray = field(init=False, repr=False, compare=False)
    _log_mean: np.ndarray = field(init=False, repr=False, compare=False)
    _log_std: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The stages as one block-diagonal system: a scan's score is then one matrix product and a
        # few vector operations instead of five of each (per-call overhead dominated: 0.45 ms
        # against 0.1 ms on the 2-core build box, where inference takes about 2.4 ms).
        width = self.width
        precision = np.zeros((width, width), dtype=np.float64)
        starts = []
        start = 0
        for layer in self.layers:
            precision[start : start + layer.dim, start : start + layer.dim] = layer.precision
            starts.append(start)
            start += layer.dim
        object.__setattr__(self, "_mean", np.concatenate([layer.mean for layer in self.layers]))
        object.__setattr__(self, "_precision", precision)
        object.__setattr__(self, "_starts", np.asarray(starts))
        object.__setattr__(self, "_log_mean", np.asarray([layer.log_mean for layer in self.layers]))
        object.__setattr__(self, "_log_std", np.asarray([layer.log_std for layer in self.layers]))

    @property
    def width(self) -> int:
        return sum(layer.dim for layer in self.layers)

    def score(self, features: np.ndarray) -> np.ndarray:
        """``(N,)`` float64 scores of ``(N, width)`` features; larger is less like training.

        The same as summing :meth:`LayerStats.standardised` over the stages (a test checks).
        """
        rows = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if rows.shape[1] != self.width:
            raise ValueError(f"features have {rows.shape[1]} columns; the fitted check reads {self.width}")
        centred = rows - self._mean
        squared = np.add.reduceat(centred @ self._precision * centred, self._starts, axis=1)
        logs = np.log(np.maximum(squared, _TINY))
        standardised = (logs - self._log_mean) / self._log_std
        total: np.ndarray = standardised.sum(axis=1)
        return total

    @classmethod
    def fit(cls, layers: Sequence[tuple[np.ndarray, np.ndarray]], train: np.ndarray) -> OodModel:
        """Build the check from each stage's ``(mean, covariance)`` and the training features.

        The covariance estimate (shrinkage) is the caller's; this inverts it and takes the
        log-distance statistics from ``train``, the same rows the covariance came from.
        """
        stats: list[LayerStats] = []
        start = 0
        for mean, covariance in layers:
            dim = int(mean.shape[0])
            precision = np.linalg.inv(np.asarray(covariance, dtype=np.float64))
            precision = (precision + precision.T) / 2
            partial = LayerStats(np.asarray(mean, dtype=np.float64), precision, 0.0, 1.0)
            logs = partial.log_distances(train[:, start : start + dim])
            stats.append(LayerStats(partial.mean, precision, float(logs.mean()), float(logs.std()) or 1.0))
            start += dim
        return cls(tuple(stats))


def save(model: OodModel, path: str | Path) -> Path:
    """Write the statistics as an ``.npz`` (no pickles) for a bundle."""
    arrays: dict[str, np.ndarray] = {"layers": np.asarray(len(model.layers))}
    for i, layer in enumerate(model.layers):
        arrays[f"mean_{i}"] = layer.mean
        arrays[f"precision_{i}"] = layer.precision
        arrays[f"log_stats_{i}"] = np.asarray([layer.log_mean, layer.log_std], dtype=np.float64)
    with open(path, "wb") as handle:
        np.savez(handle, allow_pickle=False, **arrays)
    return Path(path)


def load(path: str | Path, dims: Sequence[int] | None = None) -> OodModel:
    """Read statistics written by :func:`save`; ``dims`` (the manifest's) are checked when given."""
    try:
        with np.load(path, allow_pickle=False) as data:
            count = int(data["layers"])
            layers = tuple(
                LayerStats(
                    np.asarray(data[f"mean_{i}"], dtype=np.float64),
                    np.asarray(data[f"precision_{i}"], dtype=np.float64),
                    float(data[f"log_stats_{i}"][0]),
                    float(data[f"log_stats_{i}"][1]),
                )
                for i in range(count)
            )
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise ModelBundleError(
            f"The model's out-of-distribution statistics {path} cannot be read: {exc}.",
            action="Redeploy the model component; the bundle is incomplete or damaged.",
        ) from exc
    bad = [i for i, layer in enumerate(layers) if layer.precision.shape != (layer.dim, layer.dim)]
    if bad or any(layer.log_std <= 0 for layer in layers):
        raise ModelBundleError(
            f"The model's out-of-distribution statistics {path} are inconsistent (layer {bad or 'spread'}).",
            action="Redeploy the model component; the bundle is damaged.",
        )
    if dims is not None and [layer.dim for layer in layers] != list(dims):
        raise ModelBundleError(
            f"The model's out-of-distribution statistics {path} fit layers of widths "
            f"{[layer.dim for layer in layers]}, but the manifest's features output has {list(dims)}.",
            action="Repackage the bundle so the statistics and the model come from the same build.",
        )
    return OodModel(layers)
