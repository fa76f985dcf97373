"""The pipeline and the console are layers of their own: jobq's public API only, no CLI libraries, no SQL in
Python strings; the console sits on top (beside the CLI) and nothing below imports it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import jobqueue

REPO = Path(__file__).resolve().parents[2]
WORKERS = REPO / "workers"
CONSOLE = REPO / "console"
SQL_WORDS = re.compile(r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|LISTEN|NOTIFY)\b")


def modules(folder: Path = WORKERS) -> list[tuple[str, ast.Module]]:
    return [(p.name, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(folder.glob("*.py"))]


def wrong_imports(folder: Path, allowed: set[str]) -> list[str]:
    """Imports of jobqueue beyond its public names (and `allowed` modules), and of typer or rich."""
    public = set(jobqueue.__all__)
    wrong: list[str] = []
    for name, tree in modules(folder):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top = node.module.split(".")[0]
                if top in ("rich", "typer") or (top == "jobqueue" and node.module not in allowed):
                    wrong.append(f"{name}: from {node.module} import ...")
                elif node.module == "jobqueue":
                    wrong += [f"{name}: jobqueue.{a.name} is not public" for a in node.names if a.name not in public]
            elif isinstance(node, ast.Import):
                wrong += [f"{name}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] in ("rich", "typer")
                          or (a.name.startswith("jobqueue.") and a.name not in allowed)]
    return wrong


def test_pipeline_imports_only_jobqs_public_names() -> None:
    assert wrong_imports(WORKERS, {"jobqueue"}) == []


def test_console_imports_only_jobqs_public_names() -> None:
    assert len(modules(CONSOLE)) >= 5
    assert wrong_imports(CONSOLE, {"jobqueue"}) == []


def test_nothing_below_imports_the_console_but_the_ui_command() -> None:
    """The console is the top layer: the library and the pipeline never import it, and the CLI only in
    `jobq ui` (lazily, inside the command, so `jobq ls` works without the [ui] extra)."""
    found: list[str] = []
    for path in [*(REPO / "jobqueue").rglob("*.py"), *WORKERS.rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n.split(".")[0] == "jobq_console" for n in names):
                found.append(str(path.relative_to(REPO)))
    assert found == ["jobqueue/cli/ui.py"]
    ui = ast.parse((REPO / "jobqueue" / "cli" / "ui.py").read_text(encoding="utf-8"))
    top_level = [n for n in ui.body if isinstance(n, ast.ImportFrom | ast.Import)]
    assert not [n for n in top_level if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("jobq_console")]


@pytest.mark.parametrize("folder", [WORKERS, CONSOLE], ids=["workers", "console"])
def test_layer_sql_lives_in_its_sql_file(folder: Path) -> None:
    """No statement is built in Python: f-strings and string constants carry no SQL."""
    found: list[str] = []
    for name, tree in modules(folder):
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
                if SQL_WORDS.search(text):
                    found.append(f"{name}:{node.lineno}: {text[:60]!r}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "{schema}" in node.value:
                found.append(f"{name}:{node.lineno}: {node.value[:60]!r}")
    assert found == []
