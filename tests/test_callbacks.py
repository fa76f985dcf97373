"""Callbacks on parents' outcome (run_on="always" | "failure") and per-type retry policies (retry_on, backoff)."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import psycopg
import pytest
from support import BackgroundWorker, wait_for

from jobqueue import Client, Context, Fail, InvalidPayload, task
from jobqueue.registry import unregister

seen: dict[int, list[tuple[int, str, Any, str | None]]] = {}
attempts: dict[int, list[datetime]] = {}
lock = threading.Lock()
TYPES = ("cb_ok", "cb_bad", "cb_callback", "cb_flaky", "cb_picky", "cb_timed")


class Transient(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def cb_types() -> Any:
    task("cb_ok")(lambda ctx, payload: {"ok": payload.get("n")})

    @task("cb_bad", max_retries=0)
    def bad(ctx: Context, payload: Any) -> None:
        raise Fail("parent broke")

    @task("cb_callback")
    async def callback(ctx: Context, payload: Any) -> None:
        parents = await ctx.parents()
        with lock:
            seen[ctx.id] = [(p.id, p.status, p.result, p.error) for p in parents]

    def record(ctx: Context) -> None:
        with lock:
            attempts.setdefault(ctx.id, []).append(datetime.now().astimezone())

    @task("cb_flaky", retry_on=(Transient, TimeoutError), max_retries=2, backoff=lambda n: 0.2 * n)
    def flaky(ctx: Context, payload: Any) -> None:
        record(ctx)
        raise Transient("try again")

    @task("cb_picky", retry_on=Transient, max_retries=5)
    def picky(ctx: Context, payload: Any) -> None:
        record(ctx)
        raise KeyError("not a transient error")

    @task("cb_timed", max_retries=1, backoff=lambda n: -1)
    def timed(ctx: Context, payload: Any) -> None:
        raise Transient("x")

    yield
    for t in TYPES:
        unregister(t)


@pytest.fixture(autouse=True)
def forget() -> None:
    """Ids restart with each test's empty queue: forget the last test's runs."""
    seen.clear()
    attempts.clear()


def _status(conn: psycopg.Connection[Any], task_id: int) -> str:
    return str(conn.execute("SELECT status FROM tasks WHERE id = %s", (task_id,)).fetchone()[0])  # type: ignore[index]


def _settled(conn: psycopg.Connection[Any], ids: list[int]) -> bool:
    return conn.execute("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status IN ('done', 'failed', 'cancelled')",
                        (ids,)).fetchone()[0] == len(ids)  # type: ignore[index]


def test_parent_fails_always_child_runs_and_sees_the_outcomes(conn: psycopg.Connection[Any], client: Client,
                                                              clean: None) -> None:
    ok = client.enqueue("cb_ok", {"n": 1})
    bad = client.enqueue("cb_bad", {})
    always = client.enqueue("cb_callback", {}, depends_on=[ok, bad], run_on="always")
    on_failure = client.enqueue("cb_callback", {}, depends_on=[ok, bad], run_on="failure")
    on_success = client.enqueue("cb_callback", {}, depends_on=[ok, bad])
    after_success = client.enqueue("cb_callback", {}, depends_on=[on_success], run_on="always")
    with BackgroundWorker(list(TYPES), concurrency=4, poll_seconds=0.1):
        wait_for(lambda: _settled(conn, [always, on_failure, on_success, after_success]), timeout=30)
    assert _status(conn, always) == "done" and _status(conn, on_failure) == "done"
    assert _status(conn, on_success) == "cancelled"
    # An always-callback of a task cancelled because its parent failed still runs.
    assert _status(conn, after_success) == "done"
    expected = [(ok, "done", {"ok": 1}, None), (bad, "failed", None, "Fail: parent broke")]
    assert seen[always] == expected and seen[on_failure] == expected
    assert seen[after_success] == [(on_success, "cancelled", None, None)]


def test_all_parents_succeed_failure_child_is_cancelled_always_child_runs(conn: psycopg.Connection[Any],
                                                                          client: Client, clean: None) -> None:
    parents = [client.enqueue("cb_ok", {"n": n}) for n in range(3)]
    on_failure = client.enqueue("cb_callback", {}, depends_on=parents, run_on="failure")
    grandchild = client.enqueue("cb_callback", {}, depends_on=[on_failure])
    always = client.enqueue("cb_callback", {}, depends_on=parents, run_on="always")
    with BackgroundWorker(list(TYPES), concurrency=4, poll_seconds=0.1):
        wait_for(lambda: _settled(conn, [on_failure, grandchild, always]), timeout=30)
    assert _status(conn, always) == "done"
    assert _status(conn, on_failure) == "cancelled" and _status(conn, grandchild) == "cancelled"
    assert on_failure not in seen
    msg = conn.execute("SELECT progress_msg FROM tasks WHERE id = %s", (on_failure,)).fetchone()[0]  # type: ignore[index]
    assert "no parent task failed" in msg


def test_cancelled_parent_releases_the_always_child(conn: psycopg.Connection[Any], client: Client,
                                                    clean: None) -> None:
    parent = client.enqueue("cb_ok", {}, delay=3600)
    always = client.enqueue("cb_callback", {}, depends_on=[parent], run_on="always")
    on_success = client.enqueue("cb_callback", {}, depends_on=[parent])
    client.cancel(parent)
    assert _status(conn, always) == "queued" and _status(conn, on_success) == "cancelled"


def test_enqueue_after_the_parents_finished(conn: psycopg.Connection[Any], client: Client, clean: None) -> None:
    done = client.enqueue("cb_ok", {})
    gone = client.enqueue("cb_ok", {}, delay=3600)
    client.cancel(gone)
    conn.execute("UPDATE tasks SET status = 'done', finished_at = now() WHERE id = %s", (done,))
    assert _status(conn, client.enqueue("cb_callback", {}, depends_on=[done, gone], run_on="always")) == "queued"
    assert _status(conn, client.enqueue("cb_callback", {}, depends_on=[done, gone], run_on="failure")) == "queued"
    assert _status(conn, client.enqueue("cb_callback", {}, depends_on=[done], run_on="failure")) == "cancelled"
    assert _status(conn, client.enqueue("cb_callback", {}, depends_on=[done, gone])) == "cancelled"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"run_on": "sometimes", "depends_on": [1]}, "run_on must be one of"),
    ({"run_on": "always"}, "needs depends_on"),
])
def test_bad_run_on_is_refused(client: Client, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidPayload, match=message):
        client.enqueue("cb_callback", {}, **kwargs)


def test_retry_on_retries_listed_errors_with_the_custom_backoff(conn: psycopg.Connection[Any], client: Client,
                                                                 clean: None) -> None:
    flaky = client.enqueue("cb_flaky", {})
    picky = client.enqueue("cb_picky", {})
    with BackgroundWorker(list(TYPES), concurrency=4, poll_seconds=0.05):
        wait_for(lambda: _settled(conn, [flaky, picky]), timeout=30)
    # A listed error: retried max_retries times, each after backoff(n) = 0.2 n seconds, then failed.
    assert _status(conn, flaky) == "failed" and len(attempts[flaky]) == 3
    gaps = [(b - a).total_seconds() for a, b in zip(attempts[flaky], attempts[flaky][1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4
    # Another error: failed at once, the retries left unspent.
    assert _status(conn, picky) == "failed" and len(attempts[picky]) == 1
    row = conn.execute("SELECT retry_count, last_error FROM tasks WHERE id = %s", (picky,)).fetchone()
    assert row is not None and row[0] == 1 and "KeyError" in row[1]


def test_backoff_out_of_range_fails_the_task(conn: psycopg.Connection[Any], client: Client, clean: None) -> None:
    t = client.enqueue("cb_timed", {})
    with BackgroundWorker(["cb_timed"], concurrency=1, poll_seconds=0.05):
        wait_for(lambda: _settled(conn, [t]), timeout=30)
    row = conn.execute("SELECT status, last_error FROM tasks WHERE id = %s", (t,)).fetchone()
    assert row is not None and row[0] == "failed" and "backoff returned -1.0" in row[1]


def test_bad_retry_policies_are_refused() -> None:
    from jobqueue.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="retry_on must be exception types"):
        task("cb_x", retry_on=(ValueError, "nope"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="process-isolated"):
        task("cb_x", retry_on=ValueError, isolation="process")


def test_async_client_enqueues_callbacks(conn: psycopg.Connection[Any], db_url: str, client: Client,
                                         clean: None) -> None:
    import asyncio

    from jobqueue import AsyncClient

    async def main() -> tuple[int, int]:
        async with AsyncClient(db_url) as c:
            parent = await c.enqueue("cb_ok", {}, delay=3600)
            return parent, await c.enqueue("cb_callback", {}, depends_on=[parent], run_on="failure")

    parent, child = asyncio.run(main())
    assert conn.execute("SELECT status, run_on FROM tasks WHERE id = %s", (child,)).fetchone() == ("waiting", "failure")
    client.cancel(parent)
    assert _status(conn, child) == "queued"
