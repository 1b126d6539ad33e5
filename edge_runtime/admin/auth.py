"""Who may see the admin page, and proof that a form was posted from it.

Bound to loopback (the default) only this box reaches the page, and no token
is asked unless ``Admin.TokenFile`` is set. Bound elsewhere, a token is
required (the configuration refuses to start without one): browsers sign in
once with it and get a signed session cookie (``SameSite=Strict``,
``HttpOnly``); machines send ``Authorization: Bearer <token>``. The token is
kept only as its SHA-256 and compared in constant time.

Every POST carries the session's CSRF token (a hidden form field) and, when
the browser sends one, an ``Origin`` of this very page: a form on another site
cannot make an admin's browser retry or discard a file.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any

from ..config import read_secret_file
from ..errors import ConfigError

__all__ = ["MIN_TOKEN_LENGTH", "TokenCheck", "csrf_token", "valid_csrf"]

#: Shorter tokens are refused at start: a page reachable from the hospital network is guessed at.
MIN_TOKEN_LENGTH = 16


class TokenCheck:
    """The admin token, held as its SHA-256 only."""

    def __init__(self, digest: bytes | None) -> None:
        self._digest = digest

    @classmethod
    def from_file(cls, path: Path | None) -> TokenCheck:
        """``Admin.TokenFile``'s first line (None: no token, only for a page bound to loopback)."""
        if path is None:
            return cls(None)
        token = read_secret_file(path, "admin token", "Admin.TokenFile").strip()
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"The admin token in {path} has {len(token)} characters; at least {MIN_TOKEN_LENGTH} "
                "are required.",
                action="Write a longer token there (e.g. the output of 'openssl rand -hex 24').",
            )
        return cls(hashlib.sha256(token.encode()).digest())

    @property
    def required(self) -> bool:
        return self._digest is not None

    def matches(self, given: str | None) -> bool:
        if self._digest is None:
            return True
        if not given:
            return False
        return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self._digest)


def csrf_token(session: dict[str, Any]) -> str:
    """The session's CSRF token (made on first use; the session cookie is signed)."""
    token = session.get("csrf")
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def valid_csrf(session: dict[str, Any], given: object) -> bool:
    expected = session.get("csrf")
    return isinstance(expected, str) and isinstance(given, str) and hmac.compare_digest(expected, given)
