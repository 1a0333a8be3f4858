"""The package's shape, checked: no import cycles, Lua in documented files, small modules."""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path

import callbridge

PACKAGE = Path(callbridge.__file__).parent
MAX_MODULE_LINES = 400
# Declarative tables may run longer: every setting or metric with its comment.
DECLARATIVE = {"callbridge.config", "callbridge.metrics"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every callbridge module `path` imports, TYPE_CHECKING and function-level ones included."""
    found: set[str] = set()
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                # `from callbridge.store import keys` imports a module, not a name.
                if f"{base}.{alias.name}" in known:
                    found.add(f"{base}.{alias.name}")
                elif base in known:
                    found.add(base)
    return found


def test_no_import_cycles() -> None:
    mods = modules()
    graph = {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}
    assert len(graph) > 30, "the walk found too few modules"
    assert "callbridge.store.snapshots" in graph["callbridge.poller"]
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_every_lua_script_is_a_documented_file() -> None:
    lua = resources.files("callbridge.store").joinpath("lua")
    scripts = [f for f in lua.iterdir() if f.name.endswith(".lua")]
    assert len(scripts) >= 10
    for script in scripts:
        header = []
        for line in script.read_text().splitlines():
            if not line.startswith("--"):
                break
            header.append(line)
        text = "\n".join(header)
        if script.name.startswith("_"):  # an included snippet
            assert "--#include" in text, script.name
            continue
        for word in ("KEYS", "ARGV", "Reply"):
            assert word in text, f"{script.name}: header does not document {word}"


def test_no_lua_in_python_strings() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "redis.call(" not in text, path
        assert "redis.pcall(" not in text, path


def test_modules_stay_small() -> None:
    big = {
        module_name(p): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
        and module_name(p) not in DECLARATIVE
    }
    assert not big, big
