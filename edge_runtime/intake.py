"""Intake policy: is this scan something the deployed model is meant to read?

Two checks: :class:`IntakePolicy` reads the header before the model runs (what the scan says
it is); :class:`ScopeCheck` judges after inference (the patient's age, and whether the image
is like the model's training images).

A chest X-ray model must not be run on a knee or an MR slice: its output
would look like a finding and mean nothing. The model bundle's manifest
declares its intended use (``intended_use.modalities``, ``body_parts``,
``view_positions``); DICOM headers say what a scan is. A scan whose header
contradicts the intended use is quarantined with a reason. A tag that is
absent (and every PNG/JPEG, which carries no such tags) is let through unless
``Intake.RequireTags`` is set, because many modalities leave Body Part
Examined empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import ModelBundle
from .conformance import ood_for_backend
from .errors import BackendError, OutsideIntendedUse
from .ood import OodModel
from .results import IntendedUseVerdict

__all__ = ["IntakePolicy", "ScopeCheck"]

# DICOM PS3.16 Annex L defined terms vary by vendor; treat common synonyms as equal.
_SYNONYMS = {"THORAX": "CHEST", "LUNG": "CHEST"}


def _norm(value: Any) -> str:
    text = str(value or "").strip().upper()
    return _SYNONYMS.get(text, text)


@dataclass(frozen=True)
class IntakePolicy:
    """Allowed values per header field; an empty set allows anything."""

    modalities: frozenset[str] = frozenset()
    body_parts: frozenset[str] = frozenset()
    view_positions: frozenset[str] = frozenset()
    require_tags: bool = False
    model_name: str = "the model"

    @classmethod
    def from_intended_use(
        cls, intended_use: dict[str, Any], *, model_name: str, require_tags: bool = False
    ) -> IntakePolicy:
        def values(key: str) -> frozenset[str]:
            return frozenset(_norm(v) for v in intended_use.get(key, []) or [])

        return cls(
            values("modalities"), values("body_parts"), values("view_positions"), require_tags, model_name
        )

    def check(self, file_name: str, kind: str, metadata: dict[str, Any]) -> None:
        """Raise :class:`OutsideIntendedUse` if the header contradicts the intended use."""
        if kind != "dicom":
            return
        fields = (
            ("Modality", "modality", self.modalities),
            ("Body Part Examined", "body_part_examined", self.body_parts),
            ("View Position", "view_position", self.view_positions),
        )
        for label, key, allowed in fields:
            if not allowed:
                continue
            value = _norm(metadata.get(key))
            if not value:
                if self.require_tags:
                    raise OutsideIntendedUse(
                        f"{file_name} has no {label}, and Intake.RequireTags is set; "
                        f"{self.model_name} accepts {label} {', '.join(sorted(allowed))}.",
                        action=f"Configure the modality to fill in {label}, or unset Intake.RequireTags.",
                    )
                continue
            if value not in allowed:
                raise OutsideIntendedUse(
                    f"{file_name} is {label} {value!r}; {self.model_name} is only meant for "
                    f"{', '.join(sorted(allowed))}, so it was not analysed.",
                    action="Route these studies elsewhere, or deploy a model intended for "
                    "them. To run anyway (not recommended) set Intake.EnforceIntendedUse "
                    "to false.",
                )


@dataclass(frozen=True)
class ScopeCheck:
    """After inference: is this scan within the model's intended use (age range, OOD score)?

    The header check above refuses a scan that says it is something else (a knee, an MR). This
    one needs what only the scan itself and the model can tell: the patient's age, read from
    the header in the decoder (:mod:`edge_runtime.age`), and how unlike the training images
    the model finds the image (:mod:`edge_runtime.ood`, from the features output of the same
    run). Its verdict is part of every result; ``quarantine`` turns an outside verdict into
    :class:`OutsideIntendedUse` instead (``Intake.OutOfScope``).
    """

    age_years: tuple[float, float] | None = None
    ood: OodModel | None = None
    ood_threshold: float | None = None
    quarantine: bool = False
    model_name: str = "the model"

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, backend: str, *, out_of_scope: str = "report") -> ScopeCheck:
        """The check the bundle's manifest declares for ``backend``'s model file (statistics loaded).

        Each backend quantizes with its own scales, so each has its own statistics and threshold
        (:func:`~edge_runtime.conformance.ood_for_backend`).
        """
        fitted = ood_for_backend(bundle, backend)
        return cls(
            age_years=bundle.manifest.intended_use.age_years,
            ood=None if fitted is None else fitted[0],
            ood_threshold=None if fitted is None else fitted[1],
            quarantine=out_of_scope == "quarantine",
            model_name=f"model {bundle.name} {bundle.version}",
        )

    def verdict(self, kind: str, metadata: dict[str, Any], features: np.ndarray | None) -> IntendedUseVerdict:
        """The verdict for one scan (``features``: its row of the model's features output, or None)."""
        reasons: list[str] = []
        age_checked = False
        if self.age_years is not None and kind == "dicom":
            years = metadata.get("patient_age_years")
            if isinstance(years, int | float):
                age_checked = True
                low, high = self.age_years
                if not low <= float(years) <= high:
                    reasons.append(f"patient age outside the model's range ({low:g} to {high:g} years)")
        score: float | None = None
        if self.ood is not None and self.ood_threshold is not None:
            if features is None:
                raise BackendError(
                    f"{self.model_name} declares an out-of-distribution check, but its engine "
                    "returned no features output."
                )
            score = round(float(self.ood.score(features)[0]), 4)
            if score > self.ood_threshold:
                reasons.append(
                    f"image unlike the model's training images (out-of-distribution score "
                    f"{score:.2f}, above {self.ood_threshold:.2f})"
                )
        return IntendedUseVerdict(
            within=not reasons,
            reasons=tuple(reasons),
            age_checked=age_checked,
            ood_score=score,
            ood_threshold=None if score is None else round(float(self.ood_threshold or 0.0), 4),
        )

    def enforce(self, file_name: str, verdict: IntendedUseVerdict) -> None:
        """Raise :class:`OutsideIntendedUse` for an outside verdict when the site quarantines them."""
        if self.quarantine and not verdict.within:
            raise OutsideIntendedUse(
                f"{file_name} is outside the intended use of {self.model_name}: "
                f"{'; '.join(verdict.reasons)}. It was not assessed.",
                action="Route these studies to a model made for them. With Intake.OutOfScope: report "
                "such scans get a result that says they were not assessed, instead of quarantine.",
            )
