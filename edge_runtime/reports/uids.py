"""Deterministic DICOM UIDs for the objects we create, derived from the result's ``message_id``.

The same scan analysed by the same model version has the same
``message_id``; deriving the SR's (and heat-map's) Study/Series/SOP UIDs from
it means a redelivery after a crash sends the *same* object, which a PACS
stores once, instead of a second report. Under the root ``2.25`` the UID is
the decimal form of a 128-bit number (ISO/IEC 9834-8, as for UUIDs); under
an organisation's own root it is that root plus a decimal suffix that keeps
the UID within DICOM's 64 characters.
"""

from __future__ import annotations

import hashlib

__all__ = ["derived_uid"]

_MAX_UID = 64


def derived_uid(root: str, message_id: str, role: str) -> str:
    """The UID of object ``role`` (e.g. ``sr-series``) for one result, under ``root``."""
    digest = hashlib.sha256(f"{message_id}|{role}".encode()).digest()
    if root == "2.25":
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"
    room = _MAX_UID - len(root) - 1
    if room < 10:
        raise ValueError(f"UID root {root!r} leaves too little room for a unique suffix")
    suffix = str(int.from_bytes(digest, "big"))[:room].lstrip("0") or "1"
    return f"{root}.{suffix}"
