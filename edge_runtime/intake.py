"""Intake policy: is this scan something the deployed model is meant to read?

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

from .errors import OutsideIntendedUse

__all__ = ["IntakePolicy"]

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
