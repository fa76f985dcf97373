"""The pipeline is a layer of its own: jobq's public API only, no CLI libraries, no SQL in Python strings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jobqueue

WORKERS = Path(__file__).resolve().parents[2] / "workers"
SQL_WORDS = re.compile(r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|LISTEN|NOTIFY)\b")


def modules() -> list[tuple[str, ast.Module]]:
    return [(p.name, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(WORKERS.glob("*.py"))]


def test_pipeline_imports_only_jobqs_public_names() -> None:
    public = set(jobqueue.__all__)
    wrong: list[str] = []
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top = node.module.split(".")[0]
                if top in ("rich", "typer") or (top == "jobqueue" and node.module != "jobqueue"):
                    wrong.append(f"{name}: from {node.module} import ...")
                elif node.module == "jobqueue":
                    wrong += [f"{name}: jobqueue.{a.name} is not public" for a in node.names if a.name not in public]
            elif isinstance(node, ast.Import):
                wrong += [f"{name}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] in ("rich", "typer") or a.name.startswith("jobqueue.")]
    assert wrong == []


def test_pipeline_sql_lives_in_its_sql_file() -> None:
    """No statement is built in Python: f-strings and string constants carry no SQL."""
    found: list[str] = []
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
                if SQL_WORDS.search(text):
                    found.append(f"{name}:{node.lineno}: {text[:60]!r}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "{schema}" in node.value:
                found.append(f"{name}:{node.lineno}: {node.value[:60]!r}")
    assert found == []
