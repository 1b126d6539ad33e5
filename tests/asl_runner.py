"""A small Amazon States Language interpreter for the release pipeline's branch tests.

It walks a synthesized state machine definition state by state: ``Task``
states hand their resolved ``Parameters`` to a responder (the test's stand-in
for the AWS service, checked by the test) and apply ``ResultSelector`` and
``ResultPath``; ``Map`` runs its item processor per item (a failed item
fails the Map, which its ``Catch`` may route); ``Choice``, ``Pass``, ``Wait``
(no sleeping), ``Succeed`` and ``Fail`` behave as in Step Functions, for the subset of paths, conditions
and intrinsic functions (``States.Format``, ``States.JsonMerge``,
``States.StringToJson``, ``States.JsonToString``) the pipeline uses. Anything
else raises, so a definition that leaves the subset fails its test instead of
passing silently.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Responder = Callable[[str, dict[str, Any]], Any]

_INDEX = re.compile(r"^(\w+)\[(\d+)\]$")


def get_path(data: Any, path: str, context: dict[str, Any]) -> Any:
    """``$.a.b[0].c`` in ``data`` or ``$$.Execution.Name`` in ``context``; KeyError when absent."""
    root, rest = (context, path[2:]) if path.startswith("$$") else (data, path[1:])
    value = root
    for part in [p for p in rest.split(".") if p]:
        match = _INDEX.match(part)
        value = value[match.group(1)][int(match.group(2))] if match else value[part]
    return value


def set_path(data: dict[str, Any], path: str | None, value: Any) -> Any:
    if path is None:  # ResultPath: null keeps the input
        return data
    if path == "$":
        return value
    out = copy.deepcopy(data)
    node = out
    parts = path[2:].split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _split_args(text: str) -> list[str]:
    args, depth, quote, current = [], 0, False, ""
    for char in text:
        if char == "'" and depth == 0:
            quote = not quote
        if char == "," and depth == 0 and not quote:
            args.append(current.strip())
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(char, 0) if not quote else 0
        current += char
    if current.strip():
        args.append(current.strip())
    return args


def evaluate(expr: str, data: Any, context: dict[str, Any]) -> Any:
    """A path or an intrinsic function call."""
    if expr.startswith("$"):
        return get_path(data, expr, context)
    if expr.startswith("'") and expr.endswith("'"):
        return expr[1:-1]
    if expr in ("true", "false"):
        return expr == "true"
    match = re.match(r"^(States\.\w+)\((.*)\)$", expr, re.S)
    if not match:
        raise ValueError(f"unsupported expression {expr!r}")
    name, args = match.group(1), [evaluate(a, data, context) for a in _split_args(match.group(2))]
    if name == "States.Format":
        template, *values = args
        for value in values:
            template = template.replace("{}", str(value), 1)
        return template
    if name == "States.JsonMerge":
        left, right, deep = args
        if deep:
            raise ValueError("deep JsonMerge is not modelled")
        return {**left, **right}
    if name == "States.StringToJson":
        return json.loads(args[0])
    if name == "States.JsonToString":
        return json.dumps(args[0])
    raise ValueError(f"unsupported intrinsic {name}")


def resolve(template: Any, data: Any, context: dict[str, Any]) -> Any:
    """Parameters / ResultSelector: keys ending in ``.$`` are evaluated, the rest copied."""
    if isinstance(template, dict):
        out = {}
        for key, value in template.items():
            if key.endswith(".$"):
                out[key[:-2]] = evaluate(value, data, context)
            else:
                out[key] = resolve(value, data, context)
        return out
    if isinstance(template, list):
        return [resolve(v, data, context) for v in template]
    return template


def _condition(rule: dict[str, Any], data: Any, context: dict[str, Any]) -> bool:
    if "Or" in rule:
        return any(_condition(r, data, context) for r in rule["Or"])
    if "And" in rule:
        return all(_condition(r, data, context) for r in rule["And"])
    if "Not" in rule:
        return not _condition(rule["Not"], data, context)
    try:
        value = get_path(data, rule["Variable"], context)
        present = True
    except (KeyError, IndexError, TypeError):
        value, present = None, False
    if "IsPresent" in rule:
        return present == rule["IsPresent"]
    if not present:
        raise KeyError(f"Choice variable {rule['Variable']} is absent")
    for op, test in (
        ("BooleanEquals", lambda v, x: v is x),
        ("StringEquals", lambda v, x: v == x),
        ("NumericGreaterThan", lambda v, x: v > x),
        ("NumericLessThanEquals", lambda v, x: v <= x),
        ("NumericEquals", lambda v, x: v == x),
    ):
        if op in rule:
            return bool(test(value, rule[op]))
        if f"{op}Path" in rule:
            return bool(test(value, get_path(data, rule[f"{op}Path"], context)))
    raise ValueError(f"unsupported Choice rule {rule}")


@dataclass
class Run:
    """The outcome of one execution: the states entered, the Task calls, the end."""

    states: list[str] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    end: str = ""
    status: str = ""
    error: str | None = None
    output: Any = None

    def call(self, state: str) -> dict[str, Any]:
        """The parameters of the (last) call a Task state made."""
        found = [params for name, params in self.calls if name == state]
        if not found:
            raise AssertionError(f"{state} was never called; states: {self.states}")
        return found[-1]


class StatesError(Exception):
    """A state failed with ``error`` (a Fail state in a Map iteration)."""

    def __init__(self, error: str, cause: str = "") -> None:
        super().__init__(error)
        self.error = error
        self.cause = cause


def _map(
    state: dict[str, Any], data: Any, context: dict[str, Any], responder: Responder, result: Run
) -> None:
    """Run the item processor once per item, in order; the first failed item fails the Map."""
    items = get_path(data, state["ItemsPath"], context)
    processor = state.get("ItemProcessor") or state["Iterator"]
    for index, item in enumerate(items):
        item_context = {**context, "Map": {"Item": {"Value": item, "Index": index}}}
        item_input = resolve(state["ItemSelector"], data, item_context) if "ItemSelector" in state else item
        inner = run(processor, item_input, responder, context=item_context)
        result.states.extend(inner.states)
        result.calls.extend(inner.calls)
        if inner.status == "FAILED":
            raise StatesError(inner.error or "States.TaskFailed", f"item {index}")


def run(
    definition: dict[str, Any],
    data: dict[str, Any],
    responder: Responder,
    execution: str = "release-1",
    max_steps: int = 200,
    context: dict[str, Any] | None = None,
) -> Run:
    """Walk ``definition`` from its StartAt with ``data`` as the execution input."""
    context = context or {"Execution": {"Name": execution}, "Task": {"Token": "task-token-1"}}
    result = Run()
    name = definition["StartAt"]
    for _ in range(max_steps):
        state = definition["States"][name]
        result.states.append(name)
        kind = state["Type"]
        if kind == "Task":
            params = resolve(state.get("Parameters", {}), data, context)
            result.calls.append((name, params))
            raw = responder(name, params)
            if "ResultSelector" in state:
                raw = resolve(state["ResultSelector"], raw, context)
            data = set_path(data, state.get("ResultPath", "$"), raw)
        elif kind == "Map":
            try:
                _map(state, data, context, responder, result)
            except StatesError as exc:
                catcher = next(
                    (
                        c
                        for c in state.get("Catch", [])
                        if "States.ALL" in c["ErrorEquals"] or exc.error in c["ErrorEquals"]
                    ),
                    None,
                )
                if catcher is None:
                    result.end, result.status, result.error = name, "FAILED", exc.error
                    return result
                data = set_path(
                    data, catcher.get("ResultPath", "$"), {"Error": exc.error, "Cause": exc.cause}
                )
                name = catcher["Next"]
                continue
            data = set_path(data, state.get("ResultPath", "$"), None)
        elif kind == "Pass":
            if "Result" in state:
                data = set_path(data, state.get("ResultPath", "$"), state["Result"])
        elif kind == "Choice":
            for choice in state["Choices"]:
                if _condition(choice, data, context):
                    name = choice["Next"]
                    break
            else:
                name = state["Default"]
            continue
        elif kind == "Succeed":
            result.end, result.status, result.output = name, "SUCCEEDED", data
            return result
        elif kind == "Fail":
            result.end, result.status, result.error = name, "FAILED", state.get("Error")
            return result
        elif kind != "Wait":
            raise ValueError(f"unsupported state type {kind}")
        if state.get("End"):
            result.end, result.status, result.output = name, "SUCCEEDED", data
            return result
        name = state["Next"]
    raise AssertionError(f"no end after {max_steps} states: {result.states[-10:]}")
