"""The package's shape: imports flow one way (no cycle, in any import order) and modules stay readable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mdm_hf"
MAX_MODULE_LINES = 550  # "about 500"; a module past this wants splitting


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules ``name`` imports anywhere in its body (function-level imports included), except under
    ``if TYPE_CHECKING:``. ``from . import x`` counts as importing the submodule ``x`` when it is one."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "mdm_hf")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    target = ".".join(
                        base[: len(base) - child.level + 1] + ([child.module] if child.module else [])
                    )
                else:
                    target = child.module or ""
                if target.split(".")[0] != "mdm_hf":
                    continue
                found.add(target)
                found.update(f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in modules)
            visit(child)

    visit(ast.parse(path.read_text()))
    # The package root only re-exports lazily (``__getattr__``); importing it never imports a submodule.
    return {m for m in found if m in modules and m != name and m != "mdm_hf"}


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_is_seen():
    graph = _import_graph()
    assert "mdm_hf.config" in graph["mdm_hf.data"]  # a real edge, so an empty graph cannot pass
    assert "mdm_hf.distill" in graph["mdm_hf.cli"]


def test_no_import_cycle_in_the_package():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_command_line_imports_the_command_line():
    importers = sorted(name for name, deps in _import_graph().items() if "mdm_hf.cli" in deps)
    assert importers == [], f"{importers} import mdm_hf.cli; only scripts and the console entry point may"


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = sorted(_modules())
    if order == "reverse":
        names.reverse()
    code = f"import importlib\nfor n in {names!r}:\n    importlib.import_module(n)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_modules_stay_readable():
    long = {
        name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
