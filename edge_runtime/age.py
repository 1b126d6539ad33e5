"""The patient's age at the scan, from the DICOM header, for the intended-use check.

A model made for children must not answer for an adult, and a header is the only place a box
learns the age. DICOM states it twice over: Patient's Age (AS, ``045Y``, ``018M``, ``003W``,
``010D``) and Patient's Birth Date against the Study (or Acquisition) Date. Patient's Age wins
where both exist, as the modality computed it at the time of the study. A value that is
absent is *missing*; one that is present but cannot be read (``45 years``, a birth date after
the study, an age over 150) is *unreadable*: both are stated, never guessed.

The age is a patient attribute: it is computed in the decoder, read by the intake check and
never put in a message, a log line or a report (:mod:`edge_runtime.results` publishes only the
verdict, not the value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Literal

__all__ = ["AgeReading", "read_age"]

#: Patient's Age (VR AS): three digits and a unit; some senders drop leading zeros or add a space.
_AGE = re.compile(r"^(\d{1,3})\s?([DWMY])$")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
#: DA, and the ACR-NEMA form with dots that old archives still send.
_DATE = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_OLDEST = 150.0


@dataclass(frozen=True)
class AgeReading:
    """The age in years, or why there is none (``missing``, ``unreadable``)."""

    years: float | None
    source: Literal["PatientAge", "PatientBirthDate", "missing", "unreadable"]

    @property
    def known(self) -> bool:
        return self.years is not None


def _date(text: str | None) -> date | None:
    match = _DATE.match((text or "").strip())
    if not match:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def read_age(
    patient_age: str | None,
    birth_date: str | None = None,
    study_date: str | None = None,
    acquisition_date: str | None = None,
) -> AgeReading:
    """The patient's age at the scan from the header's text values (None or "" where absent)."""
    unreadable = False
    age_text = (patient_age or "").strip().upper()
    if age_text:
        match = _AGE.match(age_text)
        if match:
            years = int(match[1]) * _DAYS_PER[match[2]] / 365.25
            if years <= _OLDEST:
                return AgeReading(years, "PatientAge")
        unreadable = True
    born_text = (birth_date or "").strip()
    if born_text:
        born = _date(born_text)
        on = _date(study_date) or _date(acquisition_date)
        if born is not None and on is not None and born <= on:
            years = (on - born).days / 365.25
            if years <= _OLDEST:
                return AgeReading(years, "PatientBirthDate")
        unreadable = True
    return AgeReading(None, "unreadable" if unreadable else "missing")
