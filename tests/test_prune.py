"""Retention: the pruner deletes exactly the finished tasks past their retention, in batches,
keeps document chunks, and never makes a claim wait.

Written with jobqueue.testing, the plugin users get: each test has a database of its own (jobq_url,
jobq_client), so no test needs to empty the queue first."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from support import SCHEMA, BackgroundWorker, jobq_cli, wait_for

from jobqueue import Client, Context, Settings, task
from jobqueue.db.connect import aconnect
from jobqueue.db.queries import MaintenanceSQL, RuntimeSQL
from jobqueue.runtime.maintenance import pruner
from jobqueue.states import PRUNER_LOCK_KEY


@pytest.fixture
def conn(jobq_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(jobq_url, autocommit=True) as c:
        yield c


@task("p_work")
async def p_work(ctx: Context, payload: Any) -> Any:
    return None


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_conn(url: str, fn: Any) -> Any:
    conn = await aconnect(url)
    try:
        return await fn(conn)
    finally:
        await conn.close()


def history(
    conn: psycopg.Connection[Any], n: int, status: str, days_ago: float, type: str = "p_old", **extra: Any
) -> None:
    cols = ", ".join(extra)
    vals = ", ".join("%s" for _ in extra)
    conn.execute(
        f"INSERT INTO tasks (type, status, finished_at, created_at{', ' + cols if cols else ''}) "
        "SELECT %s, %s, now() - make_interval(secs => %s), "
        "now() - make_interval(secs => %s) - interval '1 s'"
        f"{', ' + vals if vals else ''} FROM generate_series(1, %s)",
        (type, status, days_ago * 86400, days_ago * 86400, *extra.values(), n),
    )


def counts(conn: psycopg.Connection[Any]) -> dict[tuple[str, int], int]:
    rows = conn.execute(
        "SELECT status, round(extract(epoch FROM now() - COALESCE(finished_at, created_at)) / 86400)"
        "::int, count(*) FROM tasks GROUP BY 1, 2"
    ).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def test_prune_keeps_what_retention_keeps(conn: psycopg.Connection[Any], jobq_url: str) -> None:
    history(conn, 20, "done", 10)
    history(conn, 5, "cancelled", 8)
    history(conn, 4, "done", 3)
    history(conn, 6, "failed", 10)
    history(conn, 3, "failed", 40)
    conn.execute(
        "INSERT INTO tasks (type, status, run_at, created_at) "
        "VALUES ('p_old', 'queued', now() - interval '40 days', now() - interval '40 days'), "
        "       ('p_old', 'waiting', now(), now() - interval '40 days')"
    )
    conn.execute(
        "INSERT INTO tasks (type, status, started_at, created_at, lease_expires_at) "
        "VALUES ('p_old', 'running', now() - interval '40 days', now() - interval '40 days', now())"
    )
    # A document's old done task with its chunk: the task goes, the chunk stays (unlinked).
    doc = conn.execute(
        "INSERT INTO documents (name, size, format, kind, parser, pages, content_digest, content) "
        "VALUES ('a.txt', 2, 'txt', 'text', 'general', 1, 'd1', 'hi') RETURNING id"
    ).fetchone()
    assert doc is not None
    task_row = conn.execute(
        "INSERT INTO tasks (type, status, doc_id, finished_at) VALUES ('p_old', 'done', %s, "
        "now() - interval '9 days') RETURNING id",
        (doc[0],),
    ).fetchone()
    assert task_row is not None
    conn.execute(
        "INSERT INTO chunks (doc_id, task_id, position, from_page, to_page, text, token_count, digest) "
        "VALUES (%s, %s, 0, 0, 0, 'hi', 1, 'c1')",
        (doc[0], task_row[0]),
    )
    settings = Settings(keep_done_days=7, keep_failed_days=30)

    dry = run(
        _with_conn(jobq_url, lambda c: pruner.prune(c, SCHEMA, pruner.default_plans(settings), dry_run=True))
    )
    assert (dry.rows, dry.batches) == (29, 0)
    assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (42,)

    result = run(
        _with_conn(jobq_url, lambda c: pruner.prune(c, SCHEMA, pruner.default_plans(settings), batch=7))
    )
    # done/cancelled: 26 eligible -> 7 + 7 + 7 + 5; failed: 3 eligible -> one short batch.
    assert (result.rows, result.batches, result.more) == (29, 5, False)
    assert counts(conn) == {
        ("done", 3): 4,
        ("failed", 10): 6,
        ("queued", 40): 1,
        ("waiting", 40): 1,
        ("running", 40): 1,
    }
    assert conn.execute("SELECT doc_id, task_id FROM chunks").fetchall() == [(doc[0], None)]
    assert conn.execute("SELECT count(*) FROM documents").fetchone() == (1,)


def test_prune_bounds_and_validation(conn: psycopg.Connection[Any], jobq_url: str) -> None:
    history(conn, 50, "done", 10)
    plan = [pruner.PrunePlan(("done",), 86400)]
    first = run(_with_conn(jobq_url, lambda c: pruner.prune(c, SCHEMA, plan, batch=10, max_batches=2)))
    assert (first.rows, first.batches, first.more) == (20, 2, True)
    rest = run(_with_conn(jobq_url, lambda c: pruner.prune(c, SCHEMA, plan, batch=10)))
    assert (rest.rows, rest.more) == (30, False)
    with pytest.raises(ValueError, match="only finished"):
        run(_with_conn(jobq_url, lambda c: pruner.prune(c, SCHEMA, [pruner.PrunePlan(("queued",), 0)])))


def test_a_pruning_batch_never_blocks_a_claim(
    conn: psycopg.Connection[Any], jobq_client: Client, jobq_url: str
) -> None:
    history(conn, 2000, "done", 10)
    jobq_client.enqueue_many("p_work", [{}] * 10)
    pruning = psycopg.connect(jobq_url)  # a batch left open: its row locks are held until commit
    try:
        with psycopg.RawCursor(pruning) as cur:
            n = cur.execute(MaintenanceSQL.load(SCHEMA).prune_delete, (["done"], 86400.0, 1000)).rowcount
        assert n == 1000
        with psycopg.connect(jobq_url, autocommit=True) as claimer:
            claimer.execute("SET lock_timeout = '500ms'")
            with psycopg.RawCursor(claimer) as cur:
                claimed = cur.execute(
                    RuntimeSQL.load(SCHEMA).claim, (["p_work"], [10], 10, "w-test", 30.0, [])
                ).fetchall()
        assert len(claimed) == 10
        pruning.commit()
    finally:
        pruning.close()
    assert conn.execute("SELECT count(*) FROM tasks WHERE status = 'done'").fetchone() == (1000,)


def test_prune_while_a_worker_keeps_claiming(
    conn: psycopg.Connection[Any], jobq_client: Client, jobq_url: str
) -> None:
    history(conn, 20_000, "done", 10)
    history(conn, 100, "done", 1)
    ids = jobq_client.enqueue_many("p_work", [{}] * 300)
    results: list[pruner.PruneResult] = []

    def prune_in_thread() -> None:
        plan = [pruner.PrunePlan(("done",), 2 * 86400)]
        results.append(run(_with_conn(jobq_url, lambda c: pruner.prune(c, SCHEMA, plan, batch=500))))

    with BackgroundWorker(["p_work"], concurrency=8, poll_seconds=0.1, maintenance=False):
        t = threading.Thread(target=prune_in_thread)
        t.start()
        jobq_client.enqueue_many("p_work", [{}] * 300)  # enqueued while the pruner deletes
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM tasks WHERE type = 'p_work' AND status = 'done'"
                ).fetchone()
                == (600,)
            ),
            timeout=60,
        )
        t.join(60)
    assert results and results[0].rows == 20_000 and results[0].batches == math.ceil(20_000 / 500) + 1
    assert conn.execute("SELECT count(*) FROM tasks WHERE type = 'p_old'").fetchone() == (100,)
    assert all(jobq_client.get(i).status == "done" for i in ids[:5])


def test_worker_maintenance_prunes_and_catches_up(
    conn: psycopg.Connection[Any], jobq_url: str
) -> None:
    history(conn, 3000, "done", 10)
    history(conn, 10, "failed", 10)
    conn.execute(
        "INSERT INTO workers (id, host, pid, types, concurrency, last_seen) "
        "VALUES ('long-gone', 'h', 1, '{p_work}', 1, now() - interval '30 days')"
    )
    settings = Settings(keep_done_days=7, keep_failed_days=30, heartbeat_seconds=0.5)

    schedule = pruner.PruneSchedule(settings)

    async def passes(c: Any) -> list[int]:
        out = [await schedule.run(c, batch=1)]  # 3000 one-row batches > the 0.2 s budget
        assert schedule.backlog
        while schedule.backlog:
            out.append(await schedule.run(c, batch=1))  # backlog: no minute's wait
        out.append(await schedule.run(c, batch=1))  # caught up: waits its minute
        return out

    got = run(_with_conn(jobq_url, passes))
    assert 0 < got[0] < 3000 and sum(got) == 3000 and got[-1] == 0
    assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (10,)
    assert conn.execute("SELECT count(*) FROM workers").fetchone() == (0,)

    # Another process holds the pruner lock: this one does nothing.
    history(conn, 5, "done", 10)
    conn.execute("SELECT pg_advisory_lock(%s)", (PRUNER_LOCK_KEY,))
    try:
        assert run(_with_conn(jobq_url, lambda c: pruner.PruneSchedule(settings).run(c, force=True))) == 0
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (PRUNER_LOCK_KEY,))
    # A real worker's heartbeat runs the pass: each worker has its own schedule (no module state), so
    # the passes above do not delay it.
    with BackgroundWorker(["p_work"], settings=settings, poll_seconds=0.1):
        wait_for(
            lambda: conn.execute("SELECT count(*) FROM tasks WHERE status = 'done'").fetchone() == (0,)
        )


def test_prune_command(conn: psycopg.Connection[Any]) -> None:
    history(conn, 4, "done", 5)
    history(conn, 2, "failed", 5)
    history(conn, 3, "done", 1)
    res = jobq_cli("prune", "--older-than", "3d", "--status", "done", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "would delete 4 finished task(s) (done)" in res.stdout
    res = jobq_cli("prune", "--older-than", "3d", "--status", "done", "--batch", "3")
    assert res.returncode == 0, res.stderr
    assert "deleted 4 finished task(s) (done) in 2 batch(es)" in res.stdout
    assert counts(conn) == {("failed", 5): 2, ("done", 1): 3}
    res = jobq_cli("prune")  # the configured retention: nothing is old enough
    assert res.returncode == 0 and "deleted 0" in res.stdout
    res = jobq_cli("prune", "--older-than", "12h")
    assert res.returncode == 0 and "deleted 5" in res.stdout
    for bad, msg in (
        (["--older-than", "3"], "not a duration"),
        (["--status", "queued"], "only finished"),
        (["--batch", "0"], "at least 1"),
    ):
        res = jobq_cli("prune", *bad)
        assert res.returncode == 1 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr
