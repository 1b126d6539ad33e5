"""The two ways building a manifest goes wrong: inputs that cannot make one, and a manifest that is wrong.

A leaf module, so the builders and the checks can share them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ManifestError", "Problem"]


class ManifestError(Exception):
    """The manifests cannot be built from these inputs; the message says what to change."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, phrased for the person who has to fix it.

    ``check`` groups problems (``schema:<label>``, ``createOptions``, ``twin``, ``image``, ``route``,
    ``config``, ``layered``, ``layout``) so tests and tools can filter without parsing the message.
    """

    manifest: str
    where: str
    message: str
    check: str

    def __str__(self) -> str:
        location = f"{self.manifest}: {self.where}" if self.where else self.manifest
        return f"{location}: {self.message} [{self.check}]"
