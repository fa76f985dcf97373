"""The observation views (migration 0003): right numbers on crafted histories, cheap plans on big ones.

Histories are written with plain SQL at chosen times relative to the server's now(), so each view's
window edges are exercised exactly; one test also lets a real worker write the rows, so the views
agree with what the hot-path SQL actually stores.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.rows import dict_row
from support import FULL, SCHEMA, BackgroundWorker, wait_for

from jobqueue import Context, Fail, task
from jobqueue.db.queries import RuntimeSQL

VIEWS = ("queue_depth", "throughput", "latency", "worker_health", "failures")
HISTORY_ROWS = 10_000_000 if FULL else 300_000


def rows(conn: psycopg.Connection[Any], sql: str, *params: Any) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    return list(cur.execute(sql, params).fetchall())


def now_minute(conn: psycopg.Connection[Any]) -> datetime:
    value = conn.execute("SELECT date_trunc('minute', now())").fetchone()
    assert value is not None
    result: datetime = value[0]
    return result


def add(conn: psycopg.Connection[Any], n: int = 1, **cols: Any) -> None:
    """Insert n tasks; values that are strings starting with '=' are SQL expressions."""
    names = list(cols)
    exprs = [v[1:] if isinstance(v, str) and v.startswith("=") else "%s" for v in cols.values()]
    params = [v for v in cols.values() if not (isinstance(v, str) and v.startswith("="))]
    conn.execute(
        f"INSERT INTO tasks ({', '.join(names)}) "
        f"SELECT {', '.join(exprs)} FROM generate_series(1, {n}) i",
        params,
    )


# ---------------------------------------------------------------- crafted histories


def test_queue_depth_counts_live_and_last_hour(conn: psycopg.Connection[Any], clean: None) -> None:
    for ago in ("10 minutes", "5 minutes", "1 minute"):
        add(conn, type="a", status="queued", run_at=f"=now() - interval '{ago}'")
    add(conn, 2, type="a", status="queued", run_at="=now() + interval '1 hour'")
    add(conn, type="a", status="running", started_at="=now()", lease_expires_at="=now() + interval '30 s'")
    add(conn, 2, type="a", status="waiting", depends_on="=ARRAY[1::bigint]", pending_deps=1)
    add(conn, type="a", priority=5, status="queued", run_at="=now() - interval '30 seconds'")
    add(conn, 4, type="b", status="done", finished_at="=now() - interval '10 minutes'")
    add(conn, type="b", status="done", finished_at="=now() - interval '2 hours'")
    add(conn, type="b", status="failed", finished_at="=now() - interval '30 minutes'")
    add(conn, type="b", status="cancelled", finished_at="=now() - interval '59 minutes'")
    conn.execute("INSERT INTO queues (type, paused) VALUES ('b', true)")

    got = {(r["type"], r["priority"]): r for r in rows(conn, "SELECT * FROM queue_depth")}
    assert set(got) == {("a", 0), ("a", 5), ("b", 0)}
    a0 = got[("a", 0)]
    assert (a0["queued"], a0["runnable"], a0["scheduled"], a0["waiting"], a0["running"]) == (5, 3, 2, 2, 1)
    assert 595 <= a0["oldest_wait_seconds"] <= 620
    assert a0["next_run_at"] is not None and a0["paused"] is False
    a5 = got[("a", 5)]
    assert (a5["queued"], a5["runnable"], a5["running"]) == (1, 1, 0)
    assert 29 <= a5["oldest_wait_seconds"] <= 50
    b0 = got[("b", 0)]
    assert (b0["queued"], b0["done_last_hour"], b0["failed_last_hour"], b0["cancelled_last_hour"]) == (
        0,
        4,
        1,
        1,
    )
    assert b0["oldest_wait_seconds"] == 0 and b0["next_run_at"] is None and b0["paused"] is True


def test_throughput_per_minute(conn: psycopg.Connection[Any], clean: None) -> None:
    m = now_minute(conn)

    def at(minutes_ago: int, seconds: int = 10) -> str:
        return (
            f"=date_trunc('minute', now()) - interval '{minutes_ago} minutes' + interval '{seconds} seconds'"
        )

    add(conn, 2, type="a", status="done", finished_at=at(3))
    add(conn, type="a", status="failed", finished_at=at(3, 50), last_error="ValueError: x")
    add(conn, type="a", status="cancelled", finished_at=at(10))
    add(conn, type="a", status="done", finished_at="=now()")
    add(conn, type="a", status="done", finished_at="=now() - interval '2 hours'")
    add(conn, type="b", status="done", finished_at="=now() - interval '61 minutes'")
    # Waiting for its retry: the attempt failed at started_at + duration (minute -5), the retry is later.
    add(
        conn,
        type="a",
        status="queued",
        retry_count=1,
        last_error="ValueError: y",
        started_at=at(5, 5),
        process_duration=2.0,
        run_at="=now() + interval '5 minutes'",
    )
    # Rescued from a dead worker: the rescue's run_at (minute -7), not the stale start.
    add(
        conn,
        type="a",
        status="queued",
        retry_count=1,
        last_error="worker h:1:abc lost (lease expired)",
        requeue_reason="lost",  # set by the rescuer; the views read it, not the text
        started_at=at(20),
        process_duration=1.0,
        run_at=at(7, 1),
    )
    # Running its retry since minute -1.
    add(
        conn,
        type="a",
        status="running",
        retry_count=2,
        last_error="ValueError: z",
        started_at=at(1, 1),
        lease_expires_at="=now() + interval '30 s'",
    )
    # Queued, never failed: not a retry.
    add(conn, type="a", status="queued", run_at="=now()")

    got = rows(conn, "SELECT * FROM throughput ORDER BY type, minute")
    if now_minute(conn) != m:  # the minute turned between insert and read: the window moved
        got = rows(conn, "SELECT * FROM throughput ORDER BY type, minute")
        m = now_minute(conn)
    assert {r["type"] for r in got} == {"a"}
    assert len(got) == 60
    assert got[0]["minute"] == m - timedelta(minutes=59) and got[-1]["minute"] == m
    by_minute = {r["minute"]: (r["done"], r["failed"], r["cancelled"], r["retried"]) for r in got}
    expected = {
        m - timedelta(minutes=3): (2, 1, 0, 0),
        m - timedelta(minutes=10): (0, 0, 1, 0),
        m - timedelta(minutes=5): (0, 0, 0, 1),
        m - timedelta(minutes=7): (0, 0, 0, 1),
        m - timedelta(minutes=1): (0, 0, 0, 1),
    }
    current = by_minute.pop(m)
    assert current in ((1, 0, 0, 0), (0, 0, 0, 0))  # now() may sit in the minute after `m`
    for minute, counts in by_minute.items():
        assert counts == expected.get(minute, (0, 0, 0, 0)), minute


def test_latency_percentiles_per_window(conn: psycopg.Connection[Any], clean: None) -> None:
    waits = [0.1 * i for i in range(100)]
    runs = [float(i) for i in range(100)]
    for w, r in zip(waits, runs, strict=True):
        add(
            conn,
            type="l",
            status="done",
            run_at=f"=now() - interval '3 minutes' - interval '{w} seconds'",
            started_at="=now() - interval '3 minutes'",
            process_duration=r,
            finished_at="=now() - interval '2 minutes'",
        )
    add(
        conn,
        50,
        type="l",
        status="failed",
        run_at="=now() - interval '40 minutes'",
        started_at="=now() - interval '30 minutes'",
        process_duration=1000.0,
        finished_at="=now() - interval '29 minutes'",
    )
    add(
        conn,
        10,
        type="l",
        status="done",
        run_at="=now() - interval '3 days'",
        started_at="=now() - interval '3 days'",
        process_duration=5.0,
        finished_at="=now() - interval '3 days'",
    )
    add(conn, 5, type="l", status="cancelled", finished_at="=now() - interval '1 minute'")  # never started

    got = {r["period"]: r for r in rows(conn, "SELECT * FROM latency WHERE type = 'l'")}
    assert set(got) == {"5m", "1h", "24h"}
    assert [got[p]["tasks"] for p in ("5m", "1h", "24h")] == [100, 150, 150]
    assert got["5m"]["period_seconds"] == 300
    recent = got["5m"]
    for q, col in ((50, "p50"), (95, "p95"), (99, "p99")):
        assert recent[f"wait_{col}"] == pytest.approx(np.percentile(waits, q), abs=1e-3)
        assert recent[f"run_{col}"] == pytest.approx(np.percentile(runs, q), abs=1e-6)
    hour_waits, hour_runs = [*waits, *[600.0] * 50], [*runs, *[1000.0] * 50]
    assert got["1h"]["wait_p50"] == pytest.approx(np.percentile(hour_waits, 50), abs=1e-3)
    assert got["1h"]["run_p95"] == pytest.approx(np.percentile(hour_runs, 95))
    assert got["1h"]["run_max"] == 1000.0 and got["1h"]["wait_max"] == pytest.approx(600.0, abs=1e-3)
    # A filter on the window does not compute the others (each is its own UNION ALL branch).
    assert rows(conn, "SELECT count(*) AS n FROM latency WHERE period = '24h'")[0]["n"] == 1


def test_worker_health_states_and_leases(conn: psycopg.Connection[Any], clean: None) -> None:
    conn.execute("""
        INSERT INTO workers (id, host, pid, types, concurrency, last_seen, stopped_at, done, failed)
        VALUES
          ('alive', 'h1', 11, '{a,b}', 4, now() - interval '2 seconds', NULL, 10, 1),
          ('stale', 'h2', 22, '{a}', 2, now() - interval '5 minutes', NULL, 3, 0),
          ('gone', 'h3', 33, '{b}', 1, now() - interval '1 hour', now() - interval '1 hour', 7, 2)""")
    add(
        conn,
        type="a",
        status="running",
        worker_id="alive",
        started_at="=now()",
        lease_expires_at="=now() + interval '30 s'",
    )
    add(
        conn,
        type="b",
        status="running",
        worker_id="alive",
        started_at="=now()",
        lease_expires_at="=now() - interval '1 s'",
    )
    add(
        conn,
        2,
        type="a",
        status="running",
        worker_id="stale",
        started_at="=now() - interval '6 minutes'",
        lease_expires_at="=now() - interval '5 minutes'",
    )
    add(conn, type="a", status="done", worker_id="alive", finished_at="=now()")

    got = {r["worker_id"]: r for r in rows(conn, "SELECT * FROM worker_health")}
    assert {k: v["state"] for k, v in got.items()} == {"alive": "alive", "stale": "stale", "gone": "stopped"}
    assert (
        got["alive"]["running"],
        got["alive"]["lease_expired"],
        got["alive"]["done"],
        got["alive"]["failed"],
    ) == (2, 1, 10, 1)
    assert (got["stale"]["running"], got["stale"]["lease_expired"]) == (2, 2)
    assert (got["gone"]["running"], got["gone"]["lease_expired"], got["gone"]["done"]) == (0, 0, 7)
    assert got["alive"]["host"] == "h1" and got["alive"]["pid"] == 11 and got["alive"]["types"] == ["a", "b"]
    assert 280 <= got["stale"]["heartbeat_age_seconds"] <= 330


def test_failures_grouped_by_error(conn: psycopg.Connection[Any], clean: None) -> None:
    tb = 'Traceback (most recent call last):\n  File "x.py", line 3, in h\n'
    for i, ago in ((12, 50), (13, 40), (99, 5)):
        add(
            conn,
            type="f",
            status="failed",
            retry_count=3,
            finished_at=f"=now() - interval '{ago} minutes'",
            last_error=f"{tb}ValueError: bad row {i}\n",
        )
    add(
        conn,
        type="f",
        status="failed",
        finished_at="=now() - interval '1 hour'",
        last_error="Fail: page 4 missing",
    )
    add(
        conn,
        type="f",
        status="queued",
        retry_count=1,
        started_at="=now() - interval '2 minutes'",
        process_duration=1.0,
        run_at="=now() + interval '1 minute'",
        last_error=f"{tb}ValueError: bad row 7",
    )
    add(
        conn,
        type="f",
        status="done",
        retry_count=1,
        finished_at="=now() - interval '3 minutes'",
        last_error="worker host-a:123:abcdef lost (lease expired)",
        requeue_reason="lost",  # set by the rescuer; the views read it, not the text
    )
    add(
        conn,
        type="g",
        status="done",
        retry_count=1,
        finished_at="=now() - interval '4 minutes'",
        last_error="worker host-b:9:fedcba lost (lease expired)",
        requeue_reason="lost",  # set by the rescuer; the views read it, not the text
    )
    add(
        conn,
        type="f",
        status="failed",
        finished_at="=now() - interval '2 days'",
        last_error="ValueError: bad row 1",
    )
    add(conn, type="f", status="done", finished_at="=now()")  # no error: not a failure

    got = {(r["type"], r["error"]): r for r in rows(conn, "SELECT * FROM failures")}
    assert set(got) == {
        ("f", "ValueError: bad row N"),
        ("f", "Fail: page N missing"),
        ("f", "worker lost (lease expired)"),
        ("g", "worker lost (lease expired)"),
    }
    bad = got[("f", "ValueError: bad row N")]
    assert (bad["failed"], bad["retried"], bad["tasks"]) == (3, 1, 4)
    assert bad["latest_message"].endswith("ValueError: bad row 7")  # the retry 2 minutes ago is the latest
    latest = rows(conn, "SELECT id FROM tasks WHERE status = 'queued'")[0]["id"]
    assert bad["latest_task_id"] == latest
    assert bad["first_seen"] < bad["last_seen"]
    lost = got[("f", "worker lost (lease expired)")]
    assert (lost["failed"], lost["retried"]) == (0, 1)
    assert got[("f", "Fail: page N missing")]["failed"] == 1


# ---------------------------------------------------------------- the views agree with a real worker

_flaky_seen: set[int] = set()


@task("v_ok")
async def v_ok(ctx: Context, payload: Any) -> Any:
    return {"ok": True}


@task("v_flaky", max_retries=3, backoff_base=0.05, backoff_max=0.1)
async def v_flaky(ctx: Context, payload: Any) -> Any:
    if ctx.id not in _flaky_seen:
        _flaky_seen.add(ctx.id)
        raise ValueError(f"flaky {ctx.id}")
    return None


@task("v_bad")
async def v_bad(ctx: Context, payload: Any) -> Any:
    raise Fail(f"bad thing {ctx.id}")


def test_views_follow_a_real_worker(client: Any, conn: psycopg.Connection[Any], clean: None) -> None:
    client.enqueue_many("v_ok", [{}] * 20)
    client.enqueue_many("v_flaky", [{}] * 3)
    client.enqueue_many("v_bad", [{}] * 2)
    with BackgroundWorker(["v_ok", "v_flaky", "v_bad"], concurrency=4, poll_seconds=0.2) as bw:
        wait_for(
            lambda: (
                conn.execute("SELECT count(*) FROM tasks WHERE finished_at IS NULL").fetchone() == (0,)
            )
        )
        health = rows(conn, "SELECT * FROM worker_health")
        assert bw.worker is not None
        assert [(h["worker_id"], h["state"], h["running"]) for h in health] == [(bw.worker.id, "alive", 0)]
        assert health[0]["types"] == ["v_ok", "v_flaky", "v_bad"]
    done = {
        r["type"]: (r["d"], r["f"])
        for r in rows(
            conn, "SELECT type, sum(done) AS d, sum(failed) AS f FROM throughput GROUP BY type"
        )
    }
    assert done == {"v_ok": (20, 0), "v_flaky": (3, 0), "v_bad": (0, 2)}
    fails = {
        (r["type"], r["error"]): (r["failed"], r["retried"])
        for r in rows(conn, "SELECT * FROM failures")
    }
    assert fails == {("v_flaky", "ValueError: flaky N"): (0, 3), ("v_bad", "Fail: bad thing N"): (2, 0)}
    lat = {r["type"]: r for r in rows(conn, "SELECT * FROM latency WHERE period = '5m'")}
    assert {t: r["tasks"] for t, r in lat.items()} == {"v_ok": 20, "v_flaky": 3, "v_bad": 2}
    assert all(0 <= r["wait_p99"] < 30 and 0 <= r["run_p99"] < 5 for r in lat.values())
    health = rows(conn, "SELECT * FROM worker_health")
    assert [(h["state"], h["done"], h["failed"]) for h in health] == [("stopped", 23, 2)]


# ---------------------------------------------------------------- plans on a large history


def load_history(conn: psycopg.Connection[Any], n: int) -> None:
    """n finished tasks over 30 days plus a live backlog, written in one statement per kind.

    Triggers are off while loading (session_replication_role) so the NOTIFY trigger does not
    aggregate millions of transition rows; ANALYZE gives the planner the real shape of the table.
    """
    conn.execute("SET session_replication_role = replica")
    try:
        conn.execute(
            """
            INSERT INTO tasks (type, priority, status, run_at, created_at, started_at, finished_at,
                                    process_duration, progress, retry_count, last_error, worker_id, attempt)
            SELECT 'type' || (i % 5), (i % 3) - 1,
                   CASE WHEN i % 100 < 95 THEN 'done' WHEN i % 100 < 99 THEN 'failed' ELSE 'cancelled' END,
                   f - interval '3 seconds', f - interval '3 seconds', f - interval '1 second', f,
                   1.0 + (i % 7) * 0.1, CASE WHEN i % 100 < 95 THEN 1 ELSE -1 END,
                   CASE WHEN i % 100 BETWEEN 95 AND 98 THEN 3 ELSE 0 END,
                   CASE WHEN i % 100 BETWEEN 95 AND 98 THEN 'ValueError: bad input ' || i END,
                   'w' || (i % 4), 1
            FROM generate_series(1, {n}) AS i,
                 LATERAL (SELECT now() - interval '1 minute'
                                 - (i::double precision / {n}) * interval '30 days'
                          AS f) x""".format(n=int(n))
        )
        conn.execute("""
            INSERT INTO tasks (type, status, run_at, retry_count, last_error, started_at,
                                    process_duration)
            SELECT 'type' || (i % 5), 'queued', now() + (i % 2) * interval '1 hour' - interval '5 minutes',
                   i % 10 / 9, CASE WHEN i % 10 = 9 THEN 'ValueError: again' END,
                   now() - interval '1 minute', 1
            FROM generate_series(1, 2000) i""")
        conn.execute("""
            INSERT INTO tasks (type, status, started_at, worker_id, lease_expires_at, attempt)
            SELECT 'type' || (i % 5), 'running', now(), 'w' || (i % 4), now() + interval '30 seconds', 1
            FROM generate_series(1, 50) i""")
        conn.execute("""
            INSERT INTO tasks (type, status, depends_on, pending_deps)
            SELECT 'type' || (i % 5), 'waiting', ARRAY[i::bigint], 1 FROM generate_series(1, 100) i""")
        conn.execute("""
            INSERT INTO workers (id, host, pid, types, concurrency)
            SELECT 'w' || i, 'h', i, '{type0}', 8 FROM generate_series(0, 3) i""")
    finally:
        conn.execute("RESET session_replication_role")
    # What autovacuum does after a bulk insert (this table's insert threshold is 5%): ANALYZE alone
    # leaves a partial index's size unknown after a TRUNCATE, and the planner then guesses it big.
    conn.execute("VACUUM ANALYZE tasks")
    conn.execute("ANALYZE workers")


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(plan_nodes(child))
    return out


def explain(
    conn: psycopg.Connection[Any], sql: str, params: Any = None, *, analyze: bool = False
) -> dict[str, Any]:
    opts = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    if params is None:
        row = conn.execute(f"EXPLAIN ({opts}) {sql}").fetchone()
    else:
        with psycopg.RawCursor(conn) as cur:
            row = cur.execute(f"EXPLAIN ({opts}) {sql}", params).fetchone()
    assert row is not None
    doc = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


def tasks_scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in plan_nodes(plan) if n.get("Relation Name") == "tasks"]


@pytest.fixture(scope="module")
def big_history(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("TRUNCATE tasks, workers, queues RESTART IDENTITY CASCADE")
        started = time.monotonic()
        load_history(c, HISTORY_ROWS)
        print(f"loaded {HISTORY_ROWS} rows in {time.monotonic() - started:.1f}s")
    return HISTORY_ROWS


@pytest.mark.parametrize("view", VIEWS)
def test_view_never_scans_history(conn: psycopg.Connection[Any], big_history: int, view: str) -> None:
    plan = explain(conn, f"SELECT * FROM {view}")
    scans = tasks_scans(plan)
    assert scans, f"{view} does not read tasks?"
    seq = [n for n in scans if n["Node Type"] == "Seq Scan"]
    assert not seq, f"{view} scans the whole tasks table: {seq}"
    # The plan is also cheap in fact: rows read from tasks are the live rows plus the recent window
    # (24 hours of a 30-day history is 3.3%), never the history.
    actual = explain(conn, f"SELECT * FROM {view}", analyze=True)
    read = sum(
        n.get("Actual Rows", 0) * n.get("Actual Loops", 1) + n.get("Rows Removed by Filter", 0)
        for n in tasks_scans(actual)
    )
    assert read < big_history * 0.05, f"{view} read {read} of {big_history} rows"
    assert not [n for n in tasks_scans(actual) if n["Node Type"] == "Seq Scan"]


def test_claim_plan_unaffected(conn: psycopg.Connection[Any], big_history: int) -> None:
    q = RuntimeSQL.load(SCHEMA)
    conn.execute("BEGIN")
    try:
        plan = explain(conn, q.claim, ["{type0,type1}", "{10,10}", 20, "w-plan", 30.0, "{}"])
    finally:
        conn.execute("ROLLBACK")
    used = {n.get("Index Name") for n in tasks_scans(plan)} - {None}
    assert "tasks_claim_idx" in used
    assert used <= {"tasks_claim_idx", "tasks_pkey"}, used
    assert not [n for n in tasks_scans(plan) if n["Node Type"] == "Seq Scan"]
