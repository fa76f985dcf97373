"""The runnable examples are tests, so the docs cannot rot (River's model)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import psycopg
from support import REPO


def load(name: str) -> ModuleType:
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quickstart(db_url: str) -> None:
    assert load("quickstart").main() == ["hello, ada", "hello, grace", "hello, linus"]


def test_transactional_enqueue(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS public.example_orders")
    assert load("transactional_enqueue").main() == (1, 1)


def test_cancel_running(db_url: str) -> None:
    status, took = load("cancel_running").main()
    assert status == "cancelled" and took < 2.0


def test_flow_control(db_url: str) -> None:
    order = load("flow_control").main()
    assert len(order) == 22
    assert order[:4].count("small-tenant") == 2  # the small tenant is not queued behind the big one


def test_queue_control(db_url: str) -> None:
    result = load("queue_control").main()
    assert result["paused_with"] == 4 and result["cancelled"] == 2
    assert result["first"] == "urgent" and result["done"] == 4 and result["retries_spent"] == 0


def test_http_api(db_url: str) -> None:
    assert load("http_api").main() == "done"


def test_every_example_is_tested() -> None:
    tested = {"quickstart", "transactional_enqueue", "cancel_running", "pipeline", "make_samples", "flow_control",
              "queue_control", "http_api"}
    present = {p.stem for p in Path(REPO / "examples").glob("*.py")}
    assert present <= tested, f"examples without a test: {present - tested}"
