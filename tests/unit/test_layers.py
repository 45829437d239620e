"""The structure of ``src/mosel``: imports point down the layers, and nothing grows too big.

A module imports only modules of its own layer or a lower one (lazy imports inside functions
count; imports under ``TYPE_CHECKING`` do not), so the import graph has no cycle and the optional
integrations stay leaves that the rest never imports. ``docs/architecture.md`` draws the layers.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "src" / "mosel"

LAYERS: dict[str, int] = {
    # 0: basics (no model, no scheduler)
    "mosel._version": 0,
    "mosel.jsonvalues": 0,
    "mosel.errors": 0,
    "mosel.clock": 0,
    "mosel.trees": 0,
    "mosel.slo": 0,
    "mosel.assign": 0,
    # 1: describing a model, its profile and its plan
    "mosel.plan": 1,
    "mosel.methods": 1,
    "mosel.spec": 1,
    "mosel.compiling": 1,
    "mosel.schema": 1,
    "mosel.schema_recorder": 1,
    "mosel.profiles": 1,
    "mosel.fingerprints": 1,
    "mosel.tail": 1,
    "mosel.escalation": 1,
    "mosel.chains": 1,
    "mosel.machine": 1,
    # 2: the online core (no threads, futures or tensors)
    "mosel.stats": 2,
    "mosel.jobs": 2,
    "mosel.queue": 2,
    "mosel.memo": 2,
    "mosel.pricing": 2,
    "mosel.admission": 2,
    "mosel.estimators": 2,
    "mosel.drift": 2,
    "mosel.drift_threshold": 2,
    "mosel.drift_armed": 2,
    "mosel.policies.blocks": 2,
    "mosel.policies.base": 2,
    "mosel.policies.baselines": 2,
    "mosel.policies.greedy": 2,
    "mosel.policies.mosel": 2,
    "mosel.policies": 2,
    "mosel.core": 2,
    "mosel.scheduler": 2,
    "mosel.replaying": 2,
    # 3: torch execution, requests, routers
    "mosel.stages": 3,
    "mosel.calibrating": 3,
    "mosel.execution": 3,
    "mosel.requests": 3,
    "mosel.bucketing": 3,
    "mosel.timing": 3,
    "mosel.routing": 3,
    "mosel.training": 3,
    "mosel.testing": 3,
    "mosel.monitoring_settings": 3,
    "mosel.monitoring": 3,
    # 4: the drivers
    "mosel.interrupts": 4,
    "mosel.server": 4,
    "mosel.simulate": 4,
    "mosel.sidework": 4,
    # 5: the public runtime
    "mosel.runtime": 5,
    "mosel.profiler": 5,
    "mosel": 5,
    # 6: optional integrations (leaves)
    "mosel.http.wire": 6,
    "mosel.http.backend": 6,
    "mosel.http.service": 6,
    "mosel.http.app": 6,
    "mosel.http": 6,
    "mosel.ray.request": 6,
    "mosel.ray.replica": 6,
    "mosel.ray.router": 6,
    "mosel.ray.autoscaling": 6,
    "mosel.ray.deployment": 6,
    "mosel.ray.client": 6,
    "mosel.ray.ingress": 6,
    "mosel.ray.backend": 6,
    "mosel.ray": 6,
}
LEAVES = ("mosel.http", "mosel.ray")
"""Optional integrations: nothing outside them imports them."""
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 100
MAX_CLASS_LINES = {"mosel.scheduler.Scheduler": 400, "mosel.policies.base.Policy": 120}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The mosel modules a module imports at run time (at top level or lazily)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mosel"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mosel"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_every_module_has_a_layer() -> None:
    assert sorted(set(_modules()) - set(LAYERS)) == [], "give new modules a layer in LAYERS"
    assert sorted(set(LAYERS) - set(_modules())) == []


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_point_down_the_layers(module: str) -> None:
    modules = _modules()
    upward = {
        imported: LAYERS[imported]
        for imported in _imports(modules[module], modules)
        if imported in LAYERS
        and imported != module
        and LAYERS[imported] > LAYERS[module]
        and not (module == "mosel" or imported.startswith(module + "."))  # a package and its parts
    }
    assert upward == {}, f"{module} (layer {LAYERS[module]}) imports from above: {upward}"


def test_the_optional_integrations_are_leaves() -> None:
    modules = _modules()
    for module, path in modules.items():
        if module.startswith(LEAVES):
            continue
        into = {m for m in _imports(path, modules) if m.startswith(LEAVES)}
        assert into == set(), f"{module} imports the optional {sorted(into)}"


def test_the_import_graph_has_no_cycle() -> None:
    modules = _modules()
    graph = {m: {d for d in _imports(p, modules) if d in modules and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == "mosel" or nxt.startswith(node + "."):  # a package re-exporting its parts
                continue
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                walk(nxt, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])


def test_no_module_and_no_function_grows_past_its_limit() -> None:
    too_long = []
    for module, path in sorted(_modules().items()):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {size} lines")
            if isinstance(node, ast.ClassDef) and f"{module}.{node.name}" in MAX_CLASS_LINES:
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES[f"{module}.{node.name}"]:
                    too_long.append(f"{module}.{node.name}: {size} lines")
    assert too_long == [], "\n".join(too_long)
