"""The class-activation map as it is drawn and compared: one definition for the runtime, the
conformance check, the reports and the training side.

A leaf (numpy only), so the TFLite export environment and the report child use the same maths
without importing the conformance check or the model stack.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HEAT_RANGE_FLOOR", "heat_difference", "normalised_heat", "positive_map"]

#: A map's contrast is never taken as less than one logit: a nearly flat map says "nowhere in
#: particular", and stretching its float rounding to full scale would draw (and compare) noise.
HEAT_RANGE_FLOOR = 1.0


def positive_map(cam: np.ndarray, positive: int) -> np.ndarray:
    """One image's ``(K, h, w)`` class-activation map -> the positive class's evidence ``(h, w)``.

    The positive class's logit map minus the mean of the others': with a
    softmax only differences of logits matter, and for two classes its mean
    over the grid is the logit margin that decides the probability.
    """
    maps = np.asarray(cam, dtype=np.float64)
    others = np.delete(maps, positive, axis=0)
    evidence: np.ndarray = maps[positive] - others.mean(axis=0) if others.shape[0] else maps[positive]
    return evidence


def normalised_heat(cam: np.ndarray, positive: int) -> np.ndarray:
    """The positive-class evidence scaled to [0, 1] as it is drawn: ``(m - min) / max(range, 1)``.

    Where the model's evidence for the positive class is highest *relative to
    the rest of this image* (Zhou et al. 2016 scale each map the same way);
    it does not say whether the finding is present, the probability does.
    """
    evidence = positive_map(cam, positive)
    low = float(evidence.min())
    scale = max(float(evidence.max()) - low, HEAT_RANGE_FLOOR)
    heat: np.ndarray = ((evidence - low) / scale).astype(np.float32)
    return heat


def heat_difference(cam: np.ndarray, reference: np.ndarray, positive: int) -> float:
    """Largest difference between two maps as drawn (:func:`normalised_heat`), 0..1.

    Raw logits are not compared: an INT8 model shifts all of an image's logits
    together (median per-image correlation with FP32 0.998 for 0.3.0) and a
    shift does not change the picture; 0.05 means 5 % of the colour scale.
    """
    return float(np.abs(normalised_heat(cam, positive) - normalised_heat(reference, positive)).max())
