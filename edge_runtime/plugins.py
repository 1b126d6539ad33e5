"""Plugin registries: a name -> ``"module:attribute"`` string, imported on first use.

Backends, sources and sinks are each found through one such table, so that a
box without an optional engine (LiteRT, the Greengrass SDK) still runs, and a
new plugin is one module plus one line in its stage's table.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_plugin"]


def load_plugin(target: str) -> Any:
    """Import ``module:attribute`` and return the attribute (ImportError if it cannot)."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ImportError(f"{module_name} has no {attribute!r}") from exc
