"""IoT Edge and IoT Hub limits that the JSON schemas do not express, each made and checked here.

* ``createOptions``: a JSON string of at most 512 characters per chunk (``createOptions``,
  ``createOptions01`` ... ``createOptions07``), at most 8 chunks; edgeAgent joins them in order.
* Twin desired properties: under 32 KB as IoT Hub counts them, keys without '.', '$', space or control
  characters and at most 1 KB, string values at most 4 KB, at most 10 levels deep, no null (IoT Hub
  reads null as "delete").
* Images: an explicit version tag, never ``latest`` (the device must run what was tested).

A deployment over these limits is accepted by IoT Hub and fails later, on the device or when IoT
Hub applies it; here it fails before anything is written.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator, Mapping
from typing import Any

from components.azure.problems import ManifestError, Problem

__all__ = [
    "CREATE_OPTIONS_CHUNK",
    "CREATE_OPTIONS_MAX_CHUNKS",
    "TWIN_DESIRED_LIMIT",
    "create_options_problems",
    "create_options_settings",
    "image_problems",
    "twin_problems",
    "twin_size",
]

CREATE_OPTIONS_CHUNK = 512
CREATE_OPTIONS_MAX_CHUNKS = 8
TWIN_DESIRED_LIMIT = 32 * 1024
TWIN_MAX_DEPTH = 10
TWIN_KEY_LIMIT = 1024
TWIN_STRING_LIMIT = 4 * 1024
_CHUNK_KEY = re.compile(r"createOptions\d*", re.I)


def _chunk_key(index: int) -> str:
    return "createOptions" if index == 0 else f"createOptions{index:02d}"


def create_options_settings(create_options: Mapping[str, Any], module: str) -> dict[str, str]:
    """``createOptions`` as IoT Edge takes it: compact JSON, split into chunks of 512 characters.

    Raises:
        ManifestError: naming the module, when the options need more than 8 chunks.
    """
    text = json.dumps(create_options, separators=(",", ":"), sort_keys=True)
    chunks = [text[i : i + CREATE_OPTIONS_CHUNK] for i in range(0, len(text), CREATE_OPTIONS_CHUNK)]
    if len(chunks) > CREATE_OPTIONS_MAX_CHUNKS:
        limit = CREATE_OPTIONS_MAX_CHUNKS * CREATE_OPTIONS_CHUNK
        raise ManifestError(
            f"{module}: createOptions is {len(text)} characters; IoT Edge takes at most "
            f"{CREATE_OPTIONS_MAX_CHUNKS} chunks of {CREATE_OPTIONS_CHUNK} ({limit}). Shorten its options."
        )
    return {_chunk_key(i): chunk for i, chunk in enumerate(chunks)}


def create_options_problems(settings: Mapping[str, Any], where: str, manifest: str) -> list[Problem]:
    """A module's ``settings`` hold createOptions chunks edgeAgent can join into a JSON object."""
    chunks = {k: v for k, v in settings.items() if _CHUNK_KEY.fullmatch(k)}
    if not chunks:
        return []
    expected = [_chunk_key(i) for i in range(len(chunks))]
    problems = []
    if sorted(chunks) != expected:
        message = f"createOptions chunks {sorted(chunks)}, expected {expected}"
        problems.append(Problem(manifest, where, message, "createOptions"))
    if len(chunks) > CREATE_OPTIONS_MAX_CHUNKS:
        message = f"{len(chunks)} createOptions chunks, IoT Edge takes at most {CREATE_OPTIONS_MAX_CHUNKS}"
        problems.append(Problem(manifest, where, message, "createOptions"))
    for key, chunk in chunks.items():
        if not isinstance(chunk, str) or len(chunk) > CREATE_OPTIONS_CHUNK:
            size = len(chunk) if isinstance(chunk, str) else type(chunk).__name__
            message = f"must be a string of at most {CREATE_OPTIONS_CHUNK} characters (is {size})"
            problems.append(Problem(manifest, f"{where}.{key}", message, "createOptions"))
    try:
        joined = json.loads("".join(str(chunks.get(k, "")) for k in expected))
        if not isinstance(joined, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        message = f"createOptions, joined, is not a JSON object: {exc}"
        problems.append(Problem(manifest, where, message, "createOptions"))
    return problems


def _string_size(text: str) -> int:
    return sum(len(ch.encode("utf-8")) for ch in text if unicodedata.category(ch) != "Cc")


def twin_size(value: Any) -> int:
    """A twin document's size as IoT Hub counts it: keys and strings, numbers 8 bytes, booleans 4.

    IoT Hub counts the characters of keys and string values (not control characters); this counts
    their UTF-8 bytes, so it errs on the large side.
    """
    if isinstance(value, Mapping):
        return sum(_string_size(str(k)) + twin_size(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(twin_size(v) for v in value)
    if isinstance(value, bool):
        return 4
    if isinstance(value, (int, float)):
        return 8
    return _string_size(value) if isinstance(value, str) else 0


def _value_problems(value: Any, where: str, manifest: str, depth: int = 1) -> Iterator[Problem]:
    if value is None:
        yield Problem(manifest, where, "null in desired properties (IoT Hub reads it as 'delete')", "twin")
    elif isinstance(value, str) and len(value.encode("utf-8")) > TWIN_STRING_LIMIT:
        yield Problem(manifest, where, f"string over IoT Hub's {TWIN_STRING_LIMIT} bytes", "twin")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _value_problems(item, f"{where}[{i}]", manifest, depth)
    elif isinstance(value, Mapping) and depth > TWIN_MAX_DEPTH:
        yield Problem(manifest, where, f"nested deeper than IoT Hub's {TWIN_MAX_DEPTH} levels", "twin")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            key = str(key)
            bad = sorted({ch for ch in key if ch in ".$ " or unicodedata.category(ch) == "Cc"})
            if bad or not key or len(key.encode("utf-8")) > TWIN_KEY_LIMIT:
                message = f"twin keys may not be empty, over 1 KB or contain {bad}"
                yield Problem(manifest, f"{where}.{key}", message, "twin")
            yield from _value_problems(item, f"{where}.{key}", manifest, depth + 1)


def twin_problems(desired: Any, where: str, manifest: str) -> list[Problem]:
    """Keys, values, depth and size of one module twin's desired properties."""
    problems = list(_value_problems(desired, where, manifest))
    size = twin_size(desired)
    if size >= TWIN_DESIRED_LIMIT:
        message = f"desired properties are {size} bytes; IoT Hub's limit is {TWIN_DESIRED_LIMIT}"
        problems.append(Problem(manifest, where, message, "twin"))
    return problems


def image_problems(module: Mapping[str, Any], where: str, manifest: str) -> list[Problem]:
    """The module's image names a version (a tag other than ``latest``, or a digest)."""
    image = str(module.get("settings", {}).get("image", ""))
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" in image or (":" in last and not last.endswith(":latest")):
        return []
    return [Problem(manifest, where, f"image {image!r} needs an explicit version tag (not latest)", "image")]
