"""The package's shape, checked: stages in their subpackages, Lua in documented files, small
modules. Import directions and cycles: import-linter's contracts in pyproject.toml."""

from __future__ import annotations

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


TOP_LEVEL = {
    # the shared core
    "config",
    "errors",
    "metrics",
    "constants",
    "tracing",
    # the wiring and operator actions
    "app",
    "demo",
    "operations",
    "janitor",
}
# models/: the shared data (statuses, pages, events and the webhook bodies), core too.
SUBPACKAGES = {"models", "poll", "deliver", "store", "api", "simulator", "cli"}


def test_the_top_level_holds_only_the_core_and_the_wiring() -> None:
    """Import directions are checked by import-linter (`lint-imports`, pyproject.toml);
    this keeps new modules from settling beside the core instead of in their stage."""
    found = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert found == TOP_LEVEL
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == SUBPACKAGES


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
