"""The arrows of docs/ARCHITECTURE.md, read from every import in the code (lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("pollen", "tasks", "strategies", "client_app", "server_app", "benchmarks", "scripts")


def imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


def _offending(room: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _files(room)
        for name in sorted(imports(path))
        if name.split(".")[0] in forbidden or name in forbidden
    ]


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        ("pollen", ("tasks", "strategies", "client_app", "server_app", "benchmarks", "scripts")),
        ("strategies", ("tasks", "client_app", "server_app", "benchmarks", "scripts")),
        ("tasks", ("strategies", "client_app", "server_app", "benchmarks", "scripts")),
        ("client_app", ("strategies", "server_app", "benchmarks", "scripts")),
        ("server_app", ("client_app", "benchmarks", "scripts")),
    ],
)
def test_arrows_point_one_way(room: str, forbidden: tuple[str, ...]) -> None:
    assert _offending(room, forbidden) == []


def test_the_math_imports_no_flower_and_no_glue() -> None:
    bad = _offending(
        "strategies/math", ("flwr", "strategies.base", "strategies.replies", "strategies.sampling")
    )
    allowed_roots = {
        "torch",
        "pollen",
        "strategies",
        "math",
        "hashlib",
        "collections",
        "dataclasses",
        "__future__",
    }
    stray = [
        f"{path.name} imports {name}"
        for path in _files("strategies/math")
        for name in imports(path)
        if name.split(".")[0] not in allowed_roots
    ]
    assert bad == [] and stray == []


def test_the_node_worker_is_flower_free_and_evaluation_and_checkpoints_import_no_strategy() -> None:
    assert not [n for n in imports(ROOT / "client_app" / "worker.py") if n.split(".")[0] == "flwr"]
    for name in ("evaluation.py", "checkpoint.py"):
        assert not [n for n in imports(ROOT / "server_app" / name) if n.split(".")[0] == "strategies"], name
