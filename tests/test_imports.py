"""The direction of imports, read off the source with `ast` (every import, including ones inside functions).

Layers: osx/ (the contract: manifest, engine key, families, errors; stdlib + numpy), the stage folders
export/, calibration/, profiles/, runtime/, and the command layer (osx/cli.py, osx/commands/) on top.
runtime/ imports only osx/ and itself (a user's install has no torch, no planner); the contract imports
no stage; no two stage folders import each other, and no two modules import each other.
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"osx": "osx", "export": "osx.export", "calibration": "osx.calibration", "profiles": "osx.profiles",
           "runtime": "osx.runtime"}
COMMAND_LAYER = ("osx.cli", "osx.__main__", "osx.commands")


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> dict[str, int]:
    """{imported osx module: line} for one module; `from pkg import sub` counts as importing pkg.sub."""
    out = {}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # osx.models.ModelConfig -> osx.models
                t = t.rpartition(".")[0]
            if t and t != name:
                out.setdefault(t, node.lineno)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer(module: str) -> str:
    if module.startswith(COMMAND_LAYER):
        return "commands"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else "osx"


def _where(a: str, b: str) -> str:
    return f"{MODULES[a].relative_to(ROOT)}:{GRAPH[a][b]} imports {b}"


def test_the_walk_sees_the_packages():
    assert {"osx.bundle", "osx.runtime.pipeline", "osx.export.exporter", "osx.profiles.planner"} <= set(MODULES)
    assert "osx.runtime.scheduler" in GRAPH["osx.runtime.pipeline"]  # `from osx.runtime import scheduler as rf`


@pytest.mark.parametrize("folder,allowed", [("runtime", {"runtime", "osx"}), ("osx", {"osx"})])
def test_runtime_and_contract_import_nothing_above_them(folder, allowed):
    bad = [_where(a, b) for a in GRAPH if layer(a) == folder for b in GRAPH[a] if layer(b) not in allowed]
    assert not bad, f"{folder}/ may import only {sorted(allowed)}:\n" + "\n".join(bad)


def test_nothing_imports_the_command_layer():
    bad = [_where(a, b) for a in GRAPH if layer(a) != "commands" for b in GRAPH[a] if layer(b) == "commands"]
    assert not bad, "\n".join(bad)


def test_no_cycle_between_stage_folders():
    edges = defaultdict(set)
    for a, targets in GRAPH.items():
        for b in targets:
            if "commands" not in (layer(a), layer(b)) and layer(a) != layer(b):
                edges[layer(a)].add(b)
    cycles = [_where(a, b) for a in GRAPH for b in GRAPH[a] if layer(a) != layer(b) and "commands" not in (layer(a), layer(b))
              and any(layer(c) == layer(a) for c in edges[layer(b)])]
    assert not cycles, "stage folders import each other:\n" + "\n".join(sorted(cycles))


def test_no_cycle_between_modules():
    """Tarjan's strongly connected components over the module graph; a package importing its own
    submodules (its __init__ re-exports) is fine, a submodule importing its package back is not."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, "modules import each other: " + "; ".join(" <-> ".join(c) for c in cycles)
