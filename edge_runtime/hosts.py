"""What a management host is: the Greengrass nucleus or Azure IoT Edge, as the service sees either.

The service runs the same way under both; only where its configuration comes
from, where it says how it is doing and which remote calls it answers differ.
Each host is one module (:mod:`.greengrass`, :mod:`.azure_edge`) that fills in
this protocol, and each host's sinks are plugins like any other
(:mod:`.sinks`). Without a host (a plain ``edge-runtime run``) the
configuration file is the source of truth and none of this is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .config import RuntimeConfig
from .errors import ConfigError

__all__ = ["ConfigOutcome", "Host", "MethodCall", "config_update_handler"]

#: A remote call: (method name, its JSON payload) -> (status code, JSON-able answer).
MethodCall = Callable[[str, Any], tuple[int, Any]]


@dataclass(frozen=True)
class ConfigOutcome:
    """What became of a configuration update, for the host to show the person who sent it."""

    applied: bool
    #: Dotted PascalCase keys that changed (applied) or nothing.
    changed: tuple[str, ...] = ()
    #: Keys that take effect only after a restart.
    needs_restart: tuple[str, ...] = ()
    #: Why it was refused (the configuration check's explanation), when not applied.
    error: str = ""
    #: What it waits for (its model folder, not there yet), when neither applied nor refused.
    waiting: str = ""


class Host(Protocol):
    """The management plane that started the service and keeps its configuration."""

    #: How an admin names it ("AWS IoT Greengrass", "Azure IoT Edge"), for the log.
    name: str

    def load_config(self) -> RuntimeConfig:
        """The configuration as the host holds it now, validated (ConfigError when it is not valid)."""

    def subscribe_to_config_updates(self, on_update: Callable[[], None]) -> None:
        """Call ``on_update()`` whenever the configuration changes; it then calls :meth:`load_config`."""

    def config_outcome(self, outcome: ConfigOutcome) -> None:
        """Say what became of the latest update where whoever sent it looks (a twin's reported properties)."""

    def serve_methods(self, call: MethodCall) -> None:
        """Answer the host's remote calls (direct methods) with ``call``; a host without them ignores it."""

    def report_status(self, snapshot: dict[str, Any]) -> None:
        """One heartbeat's health snapshot, for a host that shows it (best effort, never raises)."""

    def problem(self) -> str | None:
        """Why the host cannot be reached now (the status' reason), or None."""

    def report_running(self) -> None:
        """The service is up and taking scans."""

    def close(self) -> None:
        """Disconnect; called once, after every sink has stopped."""


def config_update_handler(
    host: Host, apply: Callable[[RuntimeConfig], None], reject: Callable[[str], None]
) -> Callable[[], None]:
    """Build the callback for configuration updates: re-read, validate, apply or reject."""

    def handle() -> None:
        try:
            new_config = host.load_config()
        except ConfigError as exc:
            reject(exc.message)
            return
        except Exception as exc:
            reject(f"could not read the updated configuration: {exc}")
            return
        apply(new_config)

    return handle
