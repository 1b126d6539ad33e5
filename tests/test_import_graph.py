"""No import circle in the project's packages (#25): checked over every import, function-local ones too.

A circle hides the layering (``errors`` -> ``config`` -> model -> ``decode``/``backends`` -> flow ->
``sources``/``sinks`` -> ``service`` -> ``cli``): the one through the configuration
(``config`` -> ``backends`` -> ``bundle`` -> ``signing`` -> ``config``) made reading a setting import
the model stack. Imports under ``if TYPE_CHECKING:`` (for annotations only) and ``if __name__ ==
"__main__":`` (an entry point, never imported) are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_runtime", "cdk", "training", "components")

#: Circles known and scheduled, each with where it goes away (none today). The test fails on any
#: other, and when a listed one is gone (so the list only shrinks).
KNOWN: dict[frozenset[str], str] = {}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if {"node_modules", "cdk.out"} & set(path.parts):
                continue
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _skipped(node: ast.If) -> bool:
    test = ast.unparse(node.test)
    return (
        test in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        or test.replace("'", '"') == '__name__ == "__main__"'
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _skipped(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's own submodules not counted as up-edges)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(f"{target}."):
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_no_import_circle_but_the_known_ones() -> None:
    found = set(circles(import_graph()))
    new = [sorted(c) for c in found - set(KNOWN)]
    assert not new, f"import circles: {new}"
    gone = [sorted(c) for c in set(KNOWN) - found]
    assert not gone, f"these circles are gone: take them off KNOWN: {gone}"


def test_the_check_finds_a_circle_through_function_local_imports() -> None:
    """The check is not vacuous: a circle made only of imports inside functions is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [frozenset({"a", "b", "c"})]
    source = "def f():\n    from .config import load_config\nif TYPE_CHECKING:\n    from .bundle import X\n"
    kinds = [ast.unparse(node) for node in _imports(ast.parse(source))]
    assert kinds == ["from .config import load_config"]


def test_reading_a_setting_does_not_import_the_model_stack() -> None:
    """config -> backends -> bundle -> signing -> config was the circle: config now reads engine names
    and key files from two leaves (backend_registry, keyfiles)."""
    graph = import_graph()
    assert graph["edge_runtime.config"] <= {
        "edge_runtime.errors",
        "edge_runtime.backend_registry",
        "edge_runtime.keyfiles",
    }, graph["edge_runtime.config"]
    assert graph["edge_runtime.keyfiles"] == set() and graph["edge_runtime.backend_registry"] == set()


#: The layers of edge_runtime, lowest first: a module imports only from its own layer or lower ones,
#: so each can be read (and tested) without what stands above it. Longest prefix wins; a module that
#: matches none fails the test, so a new one is placed on purpose. ARCHITECTURE.md draws these.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "edge_runtime",  # the package's __init__: its version
            "edge_runtime.errors",
            "edge_runtime.keyfiles",
            "edge_runtime.backend_registry",
            "edge_runtime.cpu",
            "edge_runtime.procname",
            "edge_runtime.durable",
            "edge_runtime.heat",
            "edge_runtime.plugins",
            "edge_runtime.metrics",
            "edge_runtime.decode.base",
            "edge_runtime.sources.base",
            "edge_runtime.reports.preview",
            "edge_runtime.reports.uids",
        ),
    ),
    (
        "config",
        (
            "edge_runtime.config",
            "edge_runtime.config_reference",
            "edge_runtime.live_config",
            "edge_runtime.preflight",
            "edge_runtime.privacy",
            "edge_runtime.logs",
            "edge_runtime.greengrass",
            "edge_runtime.hosts",
            "edge_runtime.azure_edge",
        ),
    ),
    (
        "model",
        (
            "edge_runtime.manifest",
            "edge_runtime.preprocess",
            "edge_runtime.signing",
            "edge_runtime.bundle",
            "edge_runtime.ood",
            "edge_runtime.results",
            "edge_runtime.age",
        ),
    ),
    (
        "decode and backends",
        (
            "edge_runtime.backends",
            "edge_runtime.conformance",
            "edge_runtime.backend_choice",
            "edge_runtime.samples",
            "edge_runtime.decode",
            "edge_runtime.intake",
            "edge_runtime.prepare",
            "edge_runtime.sandbox",
            "edge_runtime.files",
            "edge_runtime.journal_integrity",
            "edge_runtime.reports",
        ),
    ),
    (
        "flow",
        (
            "edge_runtime.pipeline",
            "edge_runtime.journal",
            "edge_runtime.health",
            "edge_runtime.drift",
            "edge_runtime.drift_watch",
            "edge_runtime.outcomes",
            "edge_runtime.flow",
            "edge_runtime.workers",
            "edge_runtime.sinks.base",
            "edge_runtime.remote_methods",
        ),
    ),
    (
        "sources and sinks",
        ("edge_runtime.sources", "edge_runtime.sinks", "edge_runtime.reports.retention"),
    ),
    ("admin", ("edge_runtime.admin",)),
    ("service", ("edge_runtime.service",)),
    ("cli", ("edge_runtime.cli",)),
)


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # The package itself stands for its __init__ only, not for everything in it.
            inside = module.startswith(f"{prefix}.") and prefix != "edge_runtime"
            if (module == prefix or inside) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    return None if best is None else best[0]


def test_edge_runtime_imports_only_downwards_through_its_layers() -> None:
    graph = {m: deps for m, deps in import_graph().items() if m.startswith("edge_runtime")}
    unplaced = sorted(m for m in graph if _layer(m) is None)
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"
    upwards = [
        f"{module} ({LAYERS[_layer(module) or 0][0]}) imports {dep} ({LAYERS[_layer(dep) or 0][0]})"
        for module, deps in sorted(graph.items())
        for dep in sorted(deps)
        if dep.startswith("edge_runtime") and (_layer(dep) or 0) > (_layer(module) or 0)
    ]
    assert not upwards, "imports against the layering:\n" + "\n".join(upwards)


def test_the_layering_check_sees_an_upward_import() -> None:
    assert _layer("edge_runtime.sinks.mqtt") == 5 and _layer("edge_runtime.sinks.base") == 4
    assert _layer("edge_runtime.reports.retention") == 5 and _layer("edge_runtime.reports.sr") == 3
    assert _layer("edge_runtime.workers") == 4 and _layer("edge_runtime.files") == 3
    assert _layer("edge_runtime.something_new") is None  # unplaced: the test above names it
