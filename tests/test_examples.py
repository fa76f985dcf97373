"""The runnable examples are tests, so the docs cannot rot (River's model)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
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


def test_tracing(db_url: str) -> None:
    result = load("tracing").main()
    assert result == {"one_trace": True, "outcomes": ["retry", "done"], "events": ["embedding 12 chunks", "stored"]}


def test_http_api(db_url: str) -> None:
    assert load("http_api").main() == "done"


def test_producer(db_url: str) -> None:
    payload, refused, kind = load("producer").main()
    assert payload == {"url": "s3://bucket/cat.png", "width": 256} and "url" in refused and kind == "transcode"


def test_wait_for_result(db_url: str) -> None:
    result, lines, failure = load("wait_for_result").main()
    assert result == {"width": 800, "height": 600}
    assert lines[-1].startswith("done 1.00") and any("tile" in line for line in lines)
    assert failure.startswith("failed") and "width must be positive, got 0" in failure


def test_ingest(db_url: str) -> None:
    status, chunks, batch, refused = load("ingest").main()
    assert status == "done" and chunks > 0 and batch == [True, False] and "empty.txt" in refused


def test_testing_with_jobq(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin example runs its own pytest session, on the suite's server."""
    monkeypatch.setenv("JOBQ_TEST_DATABASE_URL", server_url)
    assert load("testing_with_jobq").main() == 0


def test_cron(db_url: str) -> None:
    runs = load("cron").main(seconds=7.0)
    # every 2 s (code-declared) and every 3 s (added to the table) over 7 s, after the first heartbeat
    assert runs["cleanup all"] >= 2 and runs["cleanup tmp"] >= 1
    with psycopg.connect(db_url, autocommit=True) as c:
        dup = c.execute("SELECT count(*) FROM (SELECT 1 FROM tasks WHERE schedule IS NOT NULL "
                        "GROUP BY schedule, tick HAVING count(*) > 1) d").fetchone()
        assert dup == (0,)
        c.execute("DELETE FROM schedules WHERE name = 'cleanup'")


def test_callbacks(db_url: str) -> None:
    report = load("callbacks").main()
    line = "20 pages parsed; failed: task {}: Fail: page 23 is encrypted"
    assert set(report) == {"always", "failure"}
    assert report["always"] == report["failure"] and report["always"].startswith(line.split("{")[0])


def test_retry_policy(db_url: str) -> None:
    assert load("retry_policy").main() == {"embed": ("done", 3), "summarise": ("failed", 1)}


def test_cli_enqueue(db_url: str) -> None:
    ids = load("cli_enqueue").main()
    assert len(ids) == 3 and all(i.isdigit() for i in ids)


def test_every_example_is_tested() -> None:
    tested = {"quickstart", "transactional_enqueue", "cancel_running", "pipeline", "make_samples", "flow_control",
              "queue_control", "http_api", "producer", "wait_for_result", "ingest", "testing_with_jobq", "cron",
              "callbacks", "retry_policy", "cli_enqueue", "tracing"}
    present = {p.stem for p in Path(REPO / "examples").glob("*.py")}
    assert present <= tested, f"examples without a test: {present - tested}"
