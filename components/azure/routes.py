"""edgeHub routes for the runtime's outputs: made and checked here, the FHIR rule in both.

The runtime sends each result on edgeHub outputs (``Azure.*Output``): ``results`` and ``urgent`` are
de-identified and go to IoT Hub (``$upstream``); ``fhir`` carries the FHIR Bundle, which names the
study by its Study Instance UID, and may only reach a module on the same device. :func:`route`
refuses to make a route that breaks that rule and :func:`route_problems` refuses a manifest that
has one, wildcards (``FROM /messages/* INTO $upstream``) included: editing a manifest by hand must
not be a way round it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from components.azure.problems import ManifestError, Problem

__all__ = [
    "STORE_AND_FORWARD_SECONDS",
    "UPSTREAM",
    "Route",
    "module_input",
    "parse_route",
    "route",
    "route_problems",
    "runtime_routes",
]

UPSTREAM = "$upstream"
#: How long edgeHub keeps what it could not deliver: 7 days, so results survive a long weekend's
#: IoT Hub or internet outage (Friday night to Tuesday) with days to spare. edgeHub's default, 2 hours,
#: would drop them; past 7 days the runtime's journal and report files still hold every result.
STORE_AND_FORWARD_SECONDS = 7 * 24 * 3600
#: Route priorities (0 is edgeHub's highest): after an outage, urgent results leave first.
URGENT_PRIORITY = 0
RESULTS_PRIORITY = 1
_ROUTE = re.compile(r"\s*FROM\s+(?P<source>\S+)(?:\s+WHERE\s+.+?)?\s+INTO\s+(?P<sink>.+?)\s*", re.I | re.S)
_BROKERED = re.compile(r'BrokeredEndpoint\(\s*"/modules/(?P<module>[^/"]+)/inputs/(?P<input>[^/"]+)"\s*\)')
_SOURCE = re.compile(r"/messages/modules/(?P<module>[^/*]+)(?:/outputs/(?P<output>[^/*]+))?(?:/\*)?")


def module_input(module: str, name: str) -> str:
    """The sink that delivers to another module's input on this device."""
    return f'BrokeredEndpoint("/modules/{module}/inputs/{name}")'


def route(module: str, output: str, sink: str, *, fhir_output: str, priority: int) -> dict[str, Any]:
    """One route from ``module``'s ``output``; never the FHIR output into ``$upstream``.

    Raises:
        ManifestError: for the FHIR output into ``$upstream``.
    """
    if sink == UPSTREAM and output in {fhir_output, "fhir"}:
        raise ManifestError(
            f"Refusing to route {module}'s output {output!r} (FHIR Bundles, which name the study) to "
            f"{UPSTREAM}: route it only to a module on this device (--local-consumer)."
        )
    return {
        "route": f"FROM /messages/modules/{module}/outputs/{output} INTO {sink}",
        "priority": priority,
        "timeToLiveSecs": STORE_AND_FORWARD_SECONDS,
    }


def runtime_routes(module: str, azure: Mapping[str, str], consumer: str | None) -> dict[str, dict[str, Any]]:
    """Results and urgent results to IoT Hub; with a local consumer, those and FHIR to its inputs."""
    fhir = azure["FhirOutput"]
    shared = [(azure["UrgentOutput"], URGENT_PRIORITY), (azure["ResultsOutput"], RESULTS_PRIORITY)]
    routes = {
        f"{output}ToIoTHub": route(module, output, UPSTREAM, fhir_output=fhir, priority=priority)
        for output, priority in shared
        if output
    }
    for output, priority in [*shared, (fhir, RESULTS_PRIORITY)] if consumer else []:
        if output:
            sink = module_input(str(consumer), output)
            routes[f"{output}To{consumer}"] = route(module, output, sink, fhir_output=fhir, priority=priority)
    return routes


@dataclass(frozen=True)
class Route:
    """A parsed route: its source (with the module and output it names) and its sink."""

    source: str
    sink: str
    source_module: str | None
    source_output: str | None
    sink_module: str | None

    def covers(self, module: str, output: str) -> bool:
        """Whether messages on ``module``'s ``output`` match this route's source, wildcards included."""
        path = f"/messages/modules/{module}/outputs/{output}"
        if self.source.endswith("/*"):
            return path.startswith(self.source[:-1])
        return path == self.source


def parse_route(text: str) -> Route | None:
    """``FROM <source> [WHERE <condition>] INTO <sink>``, or ``None`` when ``text`` is not a route."""
    match = _ROUTE.fullmatch(text)
    if match is None:
        return None
    source = _SOURCE.fullmatch(match["source"])
    brokered = _BROKERED.fullmatch(match["sink"])
    return Route(
        source=match["source"],
        sink=match["sink"],
        source_module=source["module"] if source else None,
        source_output=source["output"] if source else None,
        sink_module=brokered["module"] if brokered else None,
    )


def _one_route_problems(
    route: Route, runtime: str, modules: set[str], outputs: set[str], fhir: Iterable[str]
) -> list[str]:
    messages = []
    if route.source_module is not None and route.source_module not in modules:
        messages.append(f"routes from module {route.source_module!r}, which is not deployed")
    if route.source_module == runtime and route.source_output and route.source_output not in outputs:
        messages.append(f"{runtime} has no output {route.source_output!r} (its outputs: {sorted(outputs)})")
    if route.sink != UPSTREAM and route.sink_module is None:
        messages.append(f"unknown sink {route.sink!r}")
    if route.sink_module is not None and route.sink_module not in modules:
        messages.append(f"delivers to module {route.sink_module!r}, which is not deployed")
    if route.sink == UPSTREAM and any(route.covers(runtime, name) for name in fhir):
        messages.append(
            f"sends {runtime}'s FHIR output to {UPSTREAM}: FHIR Bundles name the study and may only "
            "reach a module on this device"
        )
    return messages


def route_problems(
    routes: Mapping[str, Any],
    *,
    runtime: str,
    modules: set[str],
    outputs: set[str],
    fhir: Iterable[str],
    manifest: str,
) -> list[Problem]:
    """Every route readable, between modules that exist, no FHIR upstream, every output routed.

    Args:
        routes: ``$edgeHub``'s ``routes``.
        runtime: the runtime module's name.
        modules: the modules the routes may name (deployed here or by another deployment).
        outputs: the runtime's outputs that are on (each needs a route, or edgeHub drops it).
        fhir: the names the runtime's FHIR output has or would have by default.
        manifest: how problems name the manifest.
    """
    problems = []
    parsed = []
    for name, value in routes.items():
        where = f"$edgeHub.routes.{name}"
        text = value.get("route") if isinstance(value, Mapping) else value
        parsed_route = parse_route(str(text))
        if parsed_route is None:
            problems.append(Problem(manifest, where, f"cannot read route {text!r}", "route"))
            continue
        parsed.append(parsed_route)
        problems += [
            Problem(manifest, where, message, "route")
            for message in _one_route_problems(parsed_route, runtime, modules, outputs, fhir)
        ]
    for output in sorted(outputs):
        if not any(r.covers(runtime, output) for r in parsed):
            message = f"no route takes {runtime}'s output {output!r}: edgeHub would drop its messages"
            problems.append(Problem(manifest, "$edgeHub.routes", message, "route"))
    return problems
