"""A task's log ends with its final state's line (issue 13): a progress flush that took its lines before
the task finished but whose statement reaches the database after the completion (or after a user's
cancel request) must not append below it. The race is replayed statement by statement: the flush's
`progress_many` runs after the completer's statement committed, as it does when the two race."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
from support import SCHEMA

from jobqueue import Client
from jobqueue.db.queries import RuntimeSQL

Q = RuntimeSQL.load(SCHEMA)
WORKER = "order-test-worker"
LOG_CHARS = 100_000


def running_task(conn: psycopg.Connection[Any], log: str = "") -> int:
    """A task as a claim leaves it: running, attempt 1, held by WORKER."""
    row = conn.execute(
        "INSERT INTO tasks (type, status, attempt, worker_id, started_at, lease_expires_at, progress_msg) "
        "VALUES ('order_work', 'running', 1, %s, now(), now() + interval '1 minute', %s) RETURNING id",
        (WORKER, log)).fetchone()
    assert row is not None
    return int(row[0])


def log_of(conn: psycopg.Connection[Any], task_id: int) -> list[str]:
    row = conn.execute("SELECT progress_msg FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return str(row[0]).split("\n")


def run(db_url: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(db_url)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(statement, *args)
            return rows
        finally:
            await conn.close()

    return asyncio.run(go())


def flush(db_url: str, task_id: int, lines: str, progress: float | None = 0.5) -> list[asyncpg.Record]:
    return run(db_url, Q.progress_many, [task_id], [1], [progress], [lines], LOG_CHARS, WORKER)


def test_a_flush_after_done_lands_above_the_done_line(conn: psycopg.Connection[Any], clean: None,
                                                      db_url: str) -> None:
    task = running_task(conn, "10:00:00 Task has been received.")
    done = run(db_url, Q.complete_many, [task], [1], ['{"ok": 1}'], ["10:00:02 Parsed.\n10:00:02 Done in 2.00s."],
               LOG_CHARS, WORKER, False)
    assert [(r["written"], r["parents"]) for r in done] == [(1, [])]
    # The flush took "Extracted" before the handler returned; its statement commits after the completion.
    rows = flush(db_url, task, "10:00:01 Extracted 12 pages.\n10:00:01 Chunked into 40 chunks.", 0.9)
    assert [r["id"] for r in rows] == [task]  # still this attempt's: its lines are kept
    assert log_of(conn, task) == ["10:00:00 Task has been received.", "10:00:02 Parsed.",
                                  "10:00:01 Extracted 12 pages.", "10:00:01 Chunked into 40 chunks.",
                                  "10:00:02 Done in 2.00s."]
    assert conn.execute("SELECT status, progress FROM tasks WHERE id = %s", (task,)).fetchone() == ("done", 1.0)


def test_a_failed_task_ends_with_its_error(conn: psycopg.Connection[Any], clean: None, db_url: str) -> None:
    task = running_task(conn)
    run(db_url, Q.finish_many, [task], [1], ["failed"], [None], ["boom"], ["10:00:03 [ERROR] Fail: boom"], [0.0],
        [0.0], LOG_CHARS, WORKER)
    flush(db_url, task, "10:00:01 Task has been received.")
    assert log_of(conn, task) == ["10:00:01 Task has been received.", "10:00:03 [ERROR] Fail: boom"]


def test_a_cancelled_task_shows_what_it_did_before_the_cancel(conn: psycopg.Connection[Any], clean: None,
                                                               db_url: str) -> None:
    task = running_task(conn)
    # The handler reported "received" (still pending in the worker) when the user cancelled.
    assert Client(db_url).cancel(task) == {task: "running"}
    assert log_of(conn, task)[-1].endswith("[Canceled] Task stopped by user.")
    rows = flush(db_url, task, "10:00:01 Task has been received.")
    assert [r["cancel_requested"] for r in rows] == [True]
    flush(db_url, task, "10:00:02 Extracted 3 pages.")
    run(db_url, Q.finish_many, [task], [1], ["cancelled"], [None], [None],
        ["10:00:03 [Canceled] Task has been canceled."], [0.0], [0.0], LOG_CHARS, WORKER)
    flush(db_url, task, "10:00:02 Chunked into 4 chunks.")  # a last flush that lost the race
    log = log_of(conn, task)
    assert log[:2] == ["10:00:01 Task has been received.", "10:00:02 Extracted 3 pages."]
    assert log[2].endswith("[Canceled] Task stopped by user.")
    assert log[3:] == ["10:00:02 Chunked into 4 chunks.", "10:00:03 [Canceled] Task has been canceled."]


def test_lines_of_a_running_task_append_in_order(conn: psycopg.Connection[Any], clean: None, db_url: str) -> None:
    task = running_task(conn)
    for n in range(3):
        flush(db_url, task, f"10:00:0{n} step {n}")
    assert log_of(conn, task) == ["10:00:00 step 0", "10:00:01 step 1", "10:00:02 step 2"]
    # Another attempt's late flush writes nothing.
    run(db_url, Q.progress_many, [task], [2], [0.9], ["stale"], LOG_CHARS, WORKER)
    assert "stale" not in log_of(conn, task)
