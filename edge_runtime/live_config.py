"""Live configuration updates: what a new configuration changes, and how it is applied.

The Greengrass nucleus delivers configuration updates while the service runs;
:func:`diff_config` sorts each into what applies live, what reloads (and
re-verifies) the model, and what waits for a restart, so ``service.py`` only
acts on the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import RuntimeConfig

__all__ = ["ConfigChange", "diff_config"]

#: Sections whose change needs a restart (open files, threads).
_RESTART_SECTIONS = ("Inbox", "Journal", "Workers")
#: Other keys that decide which sinks exist (a restart); the rest of Reports and Dicom.Store apply live.
_RESTART_KEYS = ("Reports.FhirEndpoint", "Dicom.Store.Host")
#: Mqtt keys that belong to the connection (a restart); topics and QoS change live.
_RESTART_MQTT_KEYS = (
    "Enabled",
    "Host",
    "Port",
    "ClientId",
    "Username",
    "Password",
    "PasswordFile",
    "Tls",
    "KeepaliveSeconds",
)
#: Admin keys bound when the page starts (its socket, its token, its log buffer); the rest apply live.
_RESTART_ADMIN_KEYS = ("Enabled", "Bind", "Port", "TokenFile", "LogLines")
#: Keys whose change means loading (and verifying) the model anew.
_RELOAD_MODEL = (
    "Model.BundlePath",
    "Model.Backend",
    "Model.Threads",
    "Model.TrustedKeys",
    "Model.RequireSignature",
    "Decode",
    "Intake",
)


@dataclass(frozen=True)
class ConfigChange:
    """What a configuration update changes, as dotted PascalCase keys (as the admin wrote them)."""

    changed: list[str]
    needs_restart: list[str]
    reload_model: bool
    #: The configuration to run with: the new one, with restart-only settings kept as they run.
    effective: RuntimeConfig


def diff_config(old: RuntimeConfig, new: RuntimeConfig) -> ConfigChange:
    """Sort an update into what applies live, what reloads the model and what waits for a restart."""
    changed = _changed_keys(old.to_pascal_dict(), new.to_pascal_dict())
    needs_restart = [
        k
        for k in changed
        if k.split(".")[0] in _RESTART_SECTIONS
        or k in _RESTART_KEYS
        or (k.startswith("Mqtt.") and k.split(".")[1] in _RESTART_MQTT_KEYS)
        or (k.startswith("Admin.") and k.split(".")[1] in _RESTART_ADMIN_KEYS)
        # The DICOM receiver's port, titles and allow-lists are bound when it starts listening.
        or (k.startswith("Dicom.") and not k.startswith("Dicom.Store."))
    ]
    effective = new.model_copy(
        update={
            "inbox": old.inbox,
            "journal": old.journal,
            "workers": old.workers,
            "dicom": old.dicom.model_copy(
                update={"store": new.dicom.store.model_copy(update={"host": old.dicom.store.host})}
            ),
            "reports": new.reports.model_copy(update={"fhir_endpoint": old.reports.fhir_endpoint}),
            "mqtt": old.mqtt.model_copy(update={"topic_prefix": new.mqtt.topic_prefix, "qos": new.mqtt.qos}),
            "admin": old.admin.model_copy(
                update={
                    "read_only": new.admin.read_only,
                    "recent_scans": new.admin.recent_scans,
                    "show_images": new.admin.show_images,
                }
            ),
        }
    )
    return ConfigChange(
        changed=changed,
        needs_restart=needs_restart,
        reload_model=any(k.startswith(_RELOAD_MODEL) for k in changed),
        effective=effective,
    )


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted PascalCase paths whose values differ."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, path + ".")
        elif a != b:
            changed.append(path)
    return changed
