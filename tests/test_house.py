"""The house rules a newcomer relies on: no import cycles between solm's modules, no module over 400 lines.

The import graph is read from the source (every ``import``/``from … import`` anywhere in a module, function-level
ones included, since a lazy import still ties two modules together), not from what happens to be loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"solm_compile": ROOT / "solm_compile", "solm_compile.passes": ROOT / "passes",
         "solm_compile.runtime": ROOT / "runtime"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for prefix, root in TREES.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            name = ".".join((prefix, *rel))
            out[name.removesuffix(".__init__")] = path
    return out


def _resolve(name: str, level: int, module: str, is_pkg: bool) -> str:
    if not level:
        return name
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, mod, is_pkg)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in mods:          # `from pkg import name` → pkg unless name is a module
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):   # a package's own __init__ is no edge
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    graph = import_graph()
    # app.py imports the command modules inside a function; they must still be edges
    assert "solm_compile.cli.train" in graph["solm_compile.cli.app"]
    assert "solm_compile.passes.base" in graph["solm_compile.passes.gate_mlp"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"
