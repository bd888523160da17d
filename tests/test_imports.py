"""The packages' import structure: no import cycle, every module importable on its own, no private names borrowed.

The graph is read from the source (every ``import`` statement, at module level or inside a function: a lazy import
hides a cycle from the interpreter, not from the design), so a cycle fails here even where Python would tolerate it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qat", "train")


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the packages (a package is its ``__init__``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` of every import of one of ``known`` in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target:
                    found.append((target, "", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append((sub, "", node.lineno))
                elif base in known:
                    found.append((base, alias.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: {t for t, _, _ in _imports(name, path, known) if t != name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check itself can fail: a two-module and a three-module cycle are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"g"}, "g": set()}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_there_is_no_import_cycle() -> None:
    graph = _graph()
    assert len(graph) > 40 and "qat.methods.efficientdm" in graph and "train.models.pipeline" in graph
    assert "qat.methods.base" in graph["qat.methods.efficientdm"]  # the graph sees real edges
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_library_never_imports_the_trainer() -> None:
    graph = _graph()
    bad = {m: sorted(t for t in targets if t.split(".")[0] == "train") for m, targets in graph.items()
           if m.split(".")[0] == "qat"}
    assert not {m: t for m, t in bad.items() if t}


def test_no_private_name_is_imported_across_modules() -> None:
    modules = _modules()
    known = set(modules)
    borrowed = [f"{name}:{line} imports {target}.{what}" for name, path in modules.items()
                for target, what, line in _imports(name, path, known) if what.startswith("_")]
    assert not borrowed, borrowed


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, in an interpreter where none of the packages' modules are loaded yet."""
    names = sorted(_modules())
    code = f"""
import importlib, json, sys, traceback
failures = {{}}
for name in {names!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in {PACKAGES!r}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc().strip().splitlines()[-1]
print(json.dumps(failures))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, failures
