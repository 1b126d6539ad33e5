"""Sources: where scans come from, each handing the pipeline one :class:`ScanItem`.

A source is one module with a ``from_config(config) -> Source | None``
factory (None: switched off in this configuration) and one line in
:data:`SOURCES`. The inbox watcher is the first; the DICOM network receiver
(C-STORE SCP, ``dicom_scp``) feeds the same pipeline through its spool folder.
"""

from __future__ import annotations

from ..config import RuntimeConfig
from ..plugins import load_plugin
from .base import ScanItem, Source

__all__ = ["SOURCES", "ScanItem", "Source", "create_sources"]

#: name -> "module:factory"; the factory takes the RuntimeConfig.
SOURCES: dict[str, str] = {
    "inbox": "edge_runtime.sources.inbox:from_config",
    "dicom": "edge_runtime.sources.dicom_scp:from_config",
}


def create_sources(config: RuntimeConfig) -> dict[str, Source]:
    """The sources this configuration switches on, by name."""
    sources: dict[str, Source] = {}
    for name, target in SOURCES.items():
        source = load_plugin(target)(config)
        if source is not None:
            sources[name] = source
    return sources
