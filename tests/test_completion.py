"""The completer's lean statement for a batch of successes (issue 12): the worker runs it outside a
transaction block, so it leaves out the tasks that have dependents (their release must commit with
them) and names them; a worker then writes those in a transaction, and their children run."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
from support import SCHEMA

from jobqueue import Client, Context, task
from jobqueue.db.queries import RuntimeSQL
from jobqueue.runtime.worker import run_worker

Q = RuntimeSQL.load(SCHEMA)
WORKER = "completion-test-worker"


@task("t_cm_step", max_retries=0)
async def step(ctx: Context, payload: Any) -> Any:
    return payload


def running(conn: psycopg.Connection[Any], *, has_dependents: bool = False) -> int:
    """A task as a claim leaves it: running, attempt 1, held by WORKER."""
    row = conn.execute(
        "INSERT INTO tasks (type, status, attempt, worker_id, started_at, lease_expires_at, has_dependents) "
        "VALUES ('t_cm_step', 'running', 1, %s, now(), now() + interval '1 minute', %s) RETURNING id",
        (WORKER, has_dependents)).fetchone()
    assert row is not None
    return int(row[0])


def complete_many(db_url: str, ids: list[int], hold: bool) -> asyncpg.Record:
    async def go() -> asyncpg.Record:
        conn = await asyncpg.connect(db_url)
        try:
            row = await conn.fetchrow(Q.complete_many, ids, [1] * len(ids), [None] * len(ids),
                                      ["done"] * len(ids), 4000, WORKER, hold)
            assert row is not None
            return row
        finally:
            await conn.close()

    return asyncio.run(go())


def status(conn: psycopg.Connection[Any], task_id: int) -> str:
    row = conn.execute("SELECT status FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return str(row[0])


def test_a_batch_alone_leaves_out_and_names_the_tasks_with_dependents(
        conn: psycopg.Connection[Any], clean: None, db_url: str) -> None:
    plain, parent = running(conn), running(conn, has_dependents=True)
    alone = complete_many(db_url, [plain, parent], hold=True)
    assert (alone["written"], alone["parents"], alone["held"]) == (1, [], [parent])
    assert (status(conn, plain), status(conn, parent)) == ("done", "running")
    # Written again in a transaction (where the completer releases the dependents right after).
    again = complete_many(db_url, [parent], hold=False)
    assert (again["written"], again["parents"], again["held"]) == (1, [parent], [])
    assert status(conn, parent) == "done"


def test_children_of_tasks_completed_among_plain_ones_run(client: Client, conn: psycopg.Connection[Any],
                                                         clean: None, db_url: str) -> None:
    parents = client.enqueue_many("t_cm_step", [{"i": i} for i in range(20)])
    children = [client.enqueue("t_cm_step", {"child_of": p}, depends_on=[p]) for p in parents[::5]]
    code, stats = run_worker(["t_cm_step"], url=db_url, burst=True, concurrency=50, maintenance=False,
                             grace_seconds=0)
    assert code == 0 and stats.done == len(parents) + len(children)
    assert {status(conn, t) for t in parents + children} == {"done"}
