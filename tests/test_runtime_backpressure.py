"""Issue 12, "a collapse": a completer that falls behind must stop the claims, not let tasks whose
handlers returned pile up `running` in the table. The slow completer is simulated on a real
PostgreSQL by holding the worker's own row, which every completion statement updates."""

from __future__ import annotations

import re
import time
from typing import Any

import psycopg
import pytest
from support import SCHEMA, BackgroundWorker, one, wait_for

from jobqueue import Client, Context, task
from jobqueue.runtime.completer import BATCH


@task("t_bp_noop", max_retries=0)
async def t_bp_noop(ctx: Context, payload: Any) -> None:
    return None


def running(conn: psycopg.Connection[Any], worker: str) -> int:
    return int(one(conn, "SELECT count(*) FROM tasks WHERE status = 'running' AND worker_id = %s", worker))


@pytest.mark.usefixtures("clean")
def test_unwritten_acks_stay_within_the_bound_while_the_completer_is_blocked(
        client: Client, conn: psycopg.Connection[Any], db_url: str) -> None:
    cap, n = 5, 300  # bound = 2 x cap = 10 tasks between claim and committed ack, concurrency 50
    with BackgroundWorker(["t_bp_noop"], name="bp", concurrency=50, completion_batch=cap,
                          maintenance=False) as bw:
        wait_for(lambda: one(conn, "SELECT count(*) FROM workers WHERE id = 'bp'") == 1)
        assert bw.worker is not None
        completer = bw.worker.completer
        assert completer.bound == 2 * cap
        with psycopg.connect(db_url) as holder:
            holder.execute("SELECT 1 FROM workers WHERE id = 'bp' FOR UPDATE")  # every completion waits
            client.enqueue_many("t_bp_noop", [{"i": i} for i in range(n)])
            wait_for(lambda: completer.unwritten >= completer.bound)
            time.sleep(1.0)  # handlers return at once: without back-pressure every task would be claimed
            assert bw.worker.stats.claimed <= completer.bound
            assert running(conn, "bp") <= completer.bound
            assert completer.unwritten <= completer.bound
            holder.rollback()
        wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == n, timeout=30)
        stats = bw.worker.stats
        bw.stop()
    assert stats.done == n
    assert 0 < stats.max_unwritten <= 2 * cap


def test_the_default_batch_cap_is_bounded() -> None:
    """A batch never holds thousands of acks (the giant, ever slower statements of the collapse)."""
    assert BATCH <= 1000


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize("statement", ["complete_many", "finish_many", "progress_many", "heartbeat"])
def test_batch_statements_look_rows_up_by_key_whatever_the_statistics(
        conn: psycopg.Connection[Any], db_url: str, statement: str) -> None:
    """Statistics taken when nothing ran (autovacuum off, as on the machine's PostgreSQL 15), then
    20,000 running rows: a completion, a progress flush or a heartbeat of many tasks must still look
    each row up by its key. Planned as a join, each scanned every running row against the whole batch
    (quadratic: 9,000 acks took 57 s; a heartbeat of 3,000 tasks 40 s, longer than a lease)."""
    from jobqueue.db.queries import RuntimeSQL

    q = RuntimeSQL.load(SCHEMA)
    conn.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
    try:
        conn.execute("INSERT INTO tasks (type, payload) SELECT 't_bp_noop', '{}' FROM generate_series(1, 100)")
        conn.execute("ANALYZE tasks")
        conn.execute("INSERT INTO tasks (type, status, payload, started_at, attempt, worker_id, lease_expires_at) "
                     "SELECT 't_bp_noop', 'running', '{}', now(), 1, 'w', now() + interval '1 hour' "
                     "FROM generate_series(1, 20000)")
        ids = [r[0] for r in conn.execute("SELECT id FROM tasks WHERE status = 'running' ORDER BY id LIMIT 9000")]
        n = len(ids)
        args: tuple[Any, ...]
        args = {
            "complete_many": (ids, [1] * n, [None] * n, ["x"] * n, 4000, "w", True),
            "finish_many": (ids, [1] * n, ["retry"] * n, [None] * n, ["e"] * n, ["x"] * n, [1.0] * n, [2.0] * n,
                            4000, "w"),
            "progress_many": (ids, [1] * n, [0.5] * n, ["x"] * n, 4000, "w"),
            "heartbeat": ("w", "h", 1, ["t_bp_noop"], 100, "x", 30.0, ids, [1] * n, 0),
        }[statement]
        with psycopg.connect(db_url, cursor_factory=psycopg.RawCursor) as raw:
            plan = "\n".join(r[0] for r in raw.execute("EXPLAIN (COSTS OFF) " + getattr(q, statement), args))
    finally:
        conn.execute("ALTER TABLE tasks RESET (autovacuum_enabled)")
    # A join filter is a nested loop comparing every pair (running row, ack): quadratic.
    assert "Join Filter" not in plan, plan[:3000]
    assert re.search(r"Index Cond: \(id = [dm](_\d+)?\.id\)", plan), plan[:3000]  # one key lookup per ack
