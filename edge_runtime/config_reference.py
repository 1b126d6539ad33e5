"""The configuration reference, written from the typed configuration itself, so it cannot drift.

``edge-runtime config reference`` prints it; ``docs/configuration.md`` is its output (a test
compares them). Every key of :class:`~edge_runtime.config.RuntimeConfig`, as a file, a recipe
or an ``EDGE_RUNTIME__`` variable spells it, with its type, default, limits and description.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import ENV_PREFIX, RuntimeConfig

__all__ = ["reference_markdown"]

#: Defaults computed on the machine that reads the configuration, described instead of shown.
_MACHINE_DEFAULTS = {
    ("Model", "TrustedKeys"): "the key of the bundled models (`edge_runtime/keys/*.pub.pem`)",
    ("Mqtt", "ClientId"): "`edge-runtime-<host name>`",
}

_HEADER = """# Configuration reference

Generated from the typed configuration (`edge_runtime/config.py`) by `edge-runtime config
reference`; do not edit by hand (a test compares this file with the command's output).

Keys are PascalCase, as in a YAML or JSON file, the Greengrass component configuration and the
Azure IoT Edge module twin's desired properties (the same keys, nested the same way). Any
key can be set from the environment as `{env}<SECTION>__<KEY>=value` (for example
`{env}MQTT__HOST=broker.hospital.lan`). An empty string means "unset" for the settings whose
type says "or unset". `edge-runtime config check` prints the effective value of every key.
"""


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in members)
        return f"{name} or unset" if len(members) < len(get_args(annotation)) else name
    if origin in (tuple, list):
        return f"list of {_type_name(get_args(annotation)[0])}"
    if annotation is Path:
        return "path"
    return {bool: "true/false", int: "integer", float: "number", str: "text"}.get(annotation, str(annotation))


def _limits(field: FieldInfo) -> str:
    words = []
    for item in field.metadata:
        for kind, attribute, sign in ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<")):
            if isinstance(item, kind):
                words.append(f"{sign} {getattr(item, attribute)}")
        if isinstance(item, MinLen):
            words.append("not empty" if item.min_length == 1 else f"at least {item.min_length} characters")
        if isinstance(item, MaxLen):
            words.append(f"at most {item.max_length} characters")
    return ", ".join(words)


def _default(section: str, key: str, field: FieldInfo) -> str:
    if (section, key) in _MACHINE_DEFAULTS:
        return _MACHINE_DEFAULTS[(section, key)]
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "unset"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _rows(section: str, model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for field in model.model_fields.values():
        key = f"{prefix}{field.alias}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(section, annotation, f"{key}.")
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| `{key}` | {_type_name(annotation)} | {_default(section, key, field)} | "
            f"{_limits(field)} | {description} |"
        )
    return rows


def reference_markdown() -> str:
    """The whole reference, as Markdown."""
    out = [_HEADER.format(env=ENV_PREFIX)]
    top: list[str] = []
    sections = []
    for field in RuntimeConfig.model_fields.values():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((str(field.alias), annotation))
        else:
            top.append(str(field.alias))
    out.append("Sections: " + ", ".join(f"[{name}](#{name.lower()})" for name, _ in sections) + ".\n")
    table = "| Key | Type | Default | Limits | Meaning |\n| --- | --- | --- | --- | --- |"
    for name, model in sections:
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        out.append(f"## {name}\n\n{doc}\n\n{table}\n" + "\n".join(_rows(name, model)) + "\n")
    if top:
        rows = []
        for key in top:
            field = next(f for f in RuntimeConfig.model_fields.values() if f.alias == key)
            rows.append(
                f"| `{key}` | {_type_name(field.annotation)} | {_default('', key, field)} | "
                f"{_limits(field)} | {field.description or ''} |"
            )
        out.append(f"## Top level\n\n{table}\n" + "\n".join(rows) + "\n")
    return "\n".join(out)
