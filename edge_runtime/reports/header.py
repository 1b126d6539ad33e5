"""The scan's header made fit to copy into a report: every value valid for its VR, or absent.

Our SR and heat-map Secondary Capture copy the Patient and Study modules of
the source image (:mod:`.sr`). highdicom refuses a value that does not match
its VR (PS3.5 §6.2), so one odd attribute used to cost the scan all its
reports, and a value it does not check (``PatientAge '62'``) went into the SR
as it was, which ``dciodvfy`` then flagged. Real modalities send such headers
every day, so :func:`clean_header` returns a copy in which each value is

* kept, when it is valid for its VR;
* **normalised**, for the forms the standard asks readers to accept for
  backward compatibility with ACR-NEMA (PS3.5 §6.2, notes to DA and TM):
  ``yyyy.mm.dd`` becomes ``yyyymmdd`` and ``hh:mm:ss.frac`` becomes
  ``hhmmss.frac``; a code string (CS) in lower case is upper-cased;
* otherwise **dropped**: a date that is not a calendar date (``19510000``,
  ``JOHANNA51``), a time out of range, an age string that is not ``nnnD/W/M/Y``
  (``62``), a Patient's Sex other than the enumerated ``M``, ``F``, ``O``
  (PS3.3 C.7.1.1: ``U`` is not one of them), text longer than its VR allows or
  holding control characters. Dropping never invents a value; a type-2
  attribute the SR needs is written empty instead (:func:`.sr.build_sr`).

Each change is a :class:`HeaderFix` naming the attribute and a fixed reason,
never the value (the value may be a patient's name typed into the wrong
field): that is what the service logs. UIDs are not changed here; an invalid
one is refused at intake (:func:`edge_runtime.results.build_result`) and
:func:`.sr.build_sr` refuses it too.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from ..privacy import is_dicom_uid

__all__ = ["HeaderFix", "clean_header", "is_valid_uid", "quiet_values"]

#: PS3.3 C.7.1.1 Patient Module: Patient's Sex enumerated values.
_PATIENT_SEX = frozenset({"M", "F", "O"})
_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DA_ACR_NEMA = re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})$")
_TM = re.compile(r"^(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,6})?)?)?$")
_TM_ACR_NEMA = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?$")
_AS = re.compile(r"^\d{3}[DWMY]$")
#: Text VRs and the control characters each allows (PS3.5 §6.1.3, §6.2): ESC for character sets;
#: the long text VRs also their line and page breaks.
_TEXT_VRS: dict[str, frozenset[str]] = {
    "SH": frozenset("\x1b"),
    "LO": frozenset("\x1b"),
    "PN": frozenset("\x1b"),
    "UC": frozenset("\x1b"),
    "ST": frozenset("\x1b\r\n\f\t"),
    "LT": frozenset("\x1b\r\n\f\t"),
    "UT": frozenset("\x1b\r\n\f\t"),
}
#: VRs checked here; others (binary, tags, numbers in binary form) are copied as they are.
_CHECKED_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", *_TEXT_VRS})


@dataclass(frozen=True)
class HeaderFix:
    """One change :func:`clean_header` made: the attribute's keyword and a fixed reason, no value."""

    keyword: str
    #: ``"normalised"`` or ``"dropped"``.
    change: str
    reason: str

    def __str__(self) -> str:
        return f"{self.keyword} {self.change} ({self.reason})"


def is_valid_uid(value: Any) -> bool:
    """A DICOM UID (PS3.5 §9.1): :func:`edge_runtime.privacy.is_dicom_uid`."""
    return is_dicom_uid(value)


@contextlib.contextmanager
def quiet_values() -> Iterator[None]:
    """Read header values without pydicom's "Invalid value for VR" warnings and log records.

    Those quote the value (``Invalid value for VR UI: '<value>'``), and the service
    logs both: an invalid value is reported as a :class:`HeaderFix` instead. pydicom's
    switch is process-wide; reports are built one at a time in their own process.
    """
    with warnings.catch_warnings(), pydicom_config.disable_value_validation():
        warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
        yield


def _valid_date(text: str) -> bool:
    match = _DA.match(text)
    if match is None:
        return False
    try:
        date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return False
    return True


def _valid_time(text: str) -> bool:
    match = _TM.match(text)
    if match is None:
        return False
    hour, minute, second = int(match[1]), int(match[2] or 0), int(match[3] or 0)
    return hour < 24 and minute < 60 and second < 61  # 60: a leap second (PS3.5 §6.2 TM)


def _no_stray_controls(vr: str, text: str) -> bool:
    allowed = _TEXT_VRS[vr]
    return not any((ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0) and c not in allowed for c in text)


def _fix_value(keyword: str, vr: str, text: str) -> tuple[str | None, str | None]:
    """(value to keep or None to drop, reason when changed) for one value of one element."""
    stripped = text.strip(" \x00")
    if not stripped:
        return text, None  # empty is always valid (the attribute is present, unknown)
    if vr == "DA":
        acr = _DA_ACR_NEMA.match(stripped)
        if acr is not None and _valid_date("".join(acr.groups())):
            return "".join(acr.groups()), "ACR-NEMA date form yyyy.mm.dd"
        return (stripped, None) if _valid_date(stripped) else (None, "not a calendar date yyyymmdd")
    if vr == "TM":
        acr = _TM_ACR_NEMA.match(stripped)
        if acr is not None:
            fixed = "".join(part or "" for part in acr.groups())
            if _valid_time(fixed):
                return fixed, "ACR-NEMA time form hh:mm:ss"
        return (stripped, None) if _valid_time(stripped) else (None, "not a time hhmmss.frac")
    if vr == "AS":
        return (stripped, None) if _AS.match(stripped) else (None, "not an age string nnnD/W/M/Y")
    if vr == "UI":
        return (stripped, None) if is_valid_uid(stripped) else (None, "not a valid UID")
    if vr == "CS":
        upper = stripped.upper()
        if keyword == "PatientSex":
            if upper not in _PATIENT_SEX:
                return None, "not one of the enumerated values M, F, O"
            return upper, (None if upper == stripped else "code string in lower case")
        try:
            validate_value("CS", upper, pydicom_config.RAISE)
        except ValueError:
            return None, "not a code string"
        return upper, (None if upper == stripped else "code string in lower case")
    try:
        validate_value(vr, text, pydicom_config.RAISE)
    except (ValueError, TypeError):
        return None, f"not a valid {vr} value"
    if vr in _TEXT_VRS and not _no_stray_controls(vr, text):
        return None, f"control characters in a {vr} value"
    return text, None


def _fix_element(element: DataElement) -> tuple[Any, str | None, str | None]:
    """(new value, change, reason); change is None when the element stays as it is."""
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    fixed: list[str] = []
    reason: str | None = None
    for value in values:
        if value is None:
            return element.value, None, None
        new, why = _fix_value(element.keyword, element.VR, str(value))
        if new is None:
            return None, "dropped", why
        if why is not None:
            reason = why
        fixed.append(new)
    if reason is None:
        return element.value, None, None
    return (fixed if len(fixed) > 1 else fixed[0]), "normalised", reason


def _clean(dataset: Dataset, fixes: list[HeaderFix], *, root: bool) -> Dataset:
    clean = Dataset()
    for element in dataset:
        if element.tag in _PIXELS:
            continue
        if element.VR == "SQ":
            items = [_clean(item, fixes, root=False) for item in element.value]
            clean.add(DataElement(element.tag, "SQ", items))
            continue
        if element.VR not in _CHECKED_VRS or element.tag.is_private or (root and element.VR == "UI"):
            # A root UID is kept as it is, valid or not: the caller refuses invalid ones itself.
            clean.add(DataElement(element.tag, element.VR, copy.deepcopy(element.value)))
            continue
        value, change, reason = _fix_element(element)
        keyword = element.keyword or str(element.tag)
        if change == "dropped":
            fixes.append(HeaderFix(keyword, "dropped", reason or "invalid"))
            continue
        if change == "normalised":
            fixes.append(HeaderFix(keyword, "normalised", reason or "normalised"))
        clean.add(DataElement(element.tag, element.VR, copy.deepcopy(value)))
    return clean


#: Pixel data: a report references the image, it does not carry it.
_PIXELS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


def clean_header(source: Dataset) -> tuple[Dataset, tuple[HeaderFix, ...]]:
    """A copy of ``source`` (without pixel data) whose every checked value is valid, and what changed.

    ``source`` is not changed. Its top-level UIDs are kept as they are, even
    invalid ones (the caller refuses those with a reason of its own); every
    other invalid value is normalised where the standard names the quirk, else
    dropped. The fixes name attributes (keyword) and reasons, never values.
    """
    fixes: list[HeaderFix] = []
    with quiet_values():
        clean = _clean(source, fixes, root=True)
    return clean, tuple(fixes)
