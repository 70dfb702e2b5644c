"""The dependency rule: client and server never import each other; common neither.

``common`` is what both sides install; a hospital must be able to run the
client without the coordinator's code and the coordinator without the client's.
``simulation`` and ``benchmarks`` may import everything. Imports inside
functions count too (they still run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: package -> packages it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "common": ("client", "server", "simulation", "benchmarks"),
    "client": ("server", "simulation", "benchmarks"),
    "server": ("client", "simulation", "benchmarks"),
}


def imported_packages(source: str) -> set[str]:
    """Top-level package names imported anywhere in ``source``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.add(node.args[0].value.split(".")[0])
    return out


def violations(root: Path) -> list[str]:
    """``"file imports pkg"`` for every import that breaks :data:`FORBIDDEN`."""
    found = []
    for pkg, banned in FORBIDDEN.items():
        for f in sorted((root / pkg).rglob("*.py")):
            bad = imported_packages(f.read_text()) & set(banned)
            found += [f"{f.relative_to(root)} imports {b}" for b in sorted(bad)]
    return found


def test_packages_respect_the_dependency_rule():
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    "pkg, line, banned",
    [
        ("common", "from server.process import x", "server"),
        ("client", "import server.app", "server"),
        ("server", "def f():\n    from client import guard\n", "client"),
        ("common", "importlib.import_module('client.app')", "client"),
    ],
)
def test_a_deliberate_violation_is_caught(tmp_path, pkg, line, banned):
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "bad.py").write_text(line + "\n")
    assert violations(tmp_path) == [f"{pkg}/bad.py imports {banned}"]
