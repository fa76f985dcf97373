"""The runtime's executor, completer and progress writer against a real PostgreSQL: values the database
would refuse, poison payloads, fences on every write, attempts tracked by (id, attempt), lock order,
cancels honoured on error, shutdown of sync handlers, abandoned threads counted (issue 11: 1, 2, 4,
5, 7, 8, 9, 11)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest
from support import FULL, SCHEMA, BackgroundWorker, channel, jobq_cli, one, spawn, status, wait_for

from jobqueue import Client, Context, Snooze, get_settings, task
from jobqueue.db.queries import RuntimeSQL

pytestmark = pytest.mark.usefixtures("runs_tables")


@task("o_result")
async def o_result(ctx: Context, payload: Any) -> Any:
    if payload.get("nul"):
        return {"text": "a\x00b"}
    if payload.get("poison"):
        return {"poison": True}
    await asyncio.sleep(payload.get("s", 0))
    return {"ok": True}


@task("o_raise", max_retries=0, backoff_base=60, backoff_max=60)
async def o_raise(ctx: Context, payload: Any) -> Any:
    raise ValueError("bad\x00value" if payload.get("nul") else "plain failure")


@task("o_progress")
async def o_progress(ctx: Context, payload: Any) -> Any:
    ctx.progress(0.5, "bad\x00line")
    await asyncio.sleep(0.6)  # the progress writer flushes meanwhile
    return None


@task("o_huge_progress")
async def o_huge_progress(ctx: Context, payload: Any) -> Any:
    ctx.progress(1e300, "huge")
    await asyncio.sleep(0.6)  # the progress writer flushes meanwhile


@task("o_snooze")
async def o_snooze(ctx: Context, payload: Any) -> Any:
    raise Snooze(payload["s"])


_active: set[int] = set()
overlaps: list[int] = []


@task("o_overlap")
async def o_overlap(ctx: Context, payload: Any) -> Any:
    if ctx.id in _active:
        overlaps.append(ctx.id)
    _active.add(ctx.id)
    try:
        await asyncio.sleep(payload.get("s", 1.5))
    finally:
        _active.discard(ctx.id)


@task("o_fenced", max_retries=3)
async def o_fenced(ctx: Context, payload: Any) -> Any:
    await asyncio.sleep(0.8)  # the test hands the task to another worker meanwhile
    if payload["end"] == "raise":
        raise ValueError("late failure")
    if payload["end"] == "snooze":
        raise Snooze(1)
    ctx.progress(0.9, "late progress")
    await asyncio.sleep(0.6)


@task("o_hard", hard_timeout=0.3, max_retries=0)
def o_hard(ctx: Context, payload: Any) -> Any:
    time.sleep(2)  # ignores everything: only its return frees its thread


hung_release = threading.Event()


@task("o_hung", hard_timeout=0.3, max_retries=0)
def o_hung(ctx: Context, payload: Any) -> Any:
    hung_release.wait(30)  # ignores everything: returns when the test lets it


@task("o_no_payload_param", max_retries=0)
async def o_no_payload_param(ctx: Context) -> None:  # the wrong signature, on purpose
    """Registered with a signature the worker cannot call (no payload parameter)."""


def row(conn: psycopg.Connection[Any], task_id: int) -> dict[str, Any]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    found = cur.execute("SELECT * FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert found is not None
    return found


# ------------------------------------------------------------------ item 2: values the database refuses


def test_nul_in_one_result_fails_that_task_only(client: Client, reset: None) -> None:
    bad = client.enqueue("o_result", {"nul": True})
    good = client.enqueue_many("o_result", [{}] * 20)
    with BackgroundWorker(["o_result"], burst=True, concurrency=8) as w:
        w.thread.join(30)
    t = client.get(bad)
    assert t.status == "failed" and "NUL" in (t.last_error or "")
    assert all(client.get(i).status == "done" for i in good)


def test_a_row_the_database_refuses_does_not_lose_its_batch(client: Client, conn: psycopg.Connection[Any],
                                                            reset: None) -> None:
    conn.execute("ALTER TABLE tasks ADD CONSTRAINT test_no_poison CHECK (NOT coalesce(result ? 'poison', false)) "
                 "NOT VALID")
    try:
        bad = client.enqueue("o_result", {"poison": True})
        good = client.enqueue_many("o_result", [{}] * 20)
        with BackgroundWorker(["o_result"], burst=True, concurrency=8) as w:
            w.thread.join(30)
        t = client.get(bad)
        assert t.status == "failed" and "test_no_poison" in (t.last_error or "")
        assert "could not record" in (t.last_error or "")
        assert all(client.get(i).status == "done" for i in good)
    finally:
        conn.execute("ALTER TABLE tasks DROP CONSTRAINT test_no_poison")


def test_nul_in_error_message_is_recorded(client: Client, reset: None) -> None:
    tid = client.enqueue("o_raise", {"nul": True})
    with BackgroundWorker(["o_raise"], burst=True) as w:
        w.thread.join(30)
    t = client.get(tid)
    assert t.status == "failed" and "bad\ufffdvalue" in (t.last_error or "")


def test_nul_in_progress_line_is_written(client: Client, reset: None) -> None:
    tid = client.enqueue("o_progress", {})
    with BackgroundWorker(["o_progress"], burst=True) as w:
        w.thread.join(30)
    t = client.get(tid)
    assert t.status == "done" and "bad\ufffdline" in t.progress_msg


def test_progress_out_of_range_does_not_stop_the_progress_writer(client: Client, reset: None) -> None:
    tid = client.enqueue("o_huge_progress", {})
    with BackgroundWorker(["o_huge_progress"]) as w:
        wait_for(lambda: client.get(tid).status == "done", timeout=10)
        assert w.worker is not None and not any(t.done() for t in w.worker._tasks)  # every loop alive
    t = client.get(tid)
    assert t.progress == 1 and "huge" in t.progress_msg


def test_snooze_out_of_range_fails_with_the_reason(client: Client, reset: None) -> None:
    tid = client.enqueue("o_snooze", {"s": 1e13}, max_retries=0)
    with BackgroundWorker(["o_snooze"], burst=True) as w:
        w.thread.join(30)
    t = client.get(tid)
    assert t.status == "failed" and "out of range" in (t.last_error or "")


def test_backoff_after_a_thousand_retries_does_not_overflow(client: Client, conn: psycopg.Connection[Any],
                                                            reset: None) -> None:
    tid = client.enqueue("o_raise", {}, max_retries=5000)
    conn.execute("UPDATE tasks SET retry_count = 1100 WHERE id = %s", (tid,))
    with BackgroundWorker(["o_raise"], maintenance=False):
        wait_for(lambda: one(conn, "SELECT retry_count FROM tasks WHERE id = %s", tid) == 1101, timeout=10)
    t = row(conn, tid)
    assert t["status"] == "queued" and "plain failure" in t["last_error"]
    assert one(conn, "SELECT run_at > now() + interval '25 s' FROM tasks WHERE id = %s", tid)


# ------------------------------------------------------------------ item 4: poison payloads


def test_poison_payload_fails_alone(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    deep = one(conn, "INSERT INTO tasks (type, payload) VALUES ('o_result', (repeat('[', 2000) || "
                     "repeat(']', 2000))::jsonb) RETURNING id")
    huge = one(conn, "INSERT INTO tasks (type, payload) VALUES ('o_result', repeat('9', 5000)::jsonb) RETURNING id")
    good = client.enqueue_many("o_result", [{}] * 5)
    with BackgroundWorker(["o_result"], burst=True, concurrency=8) as w:
        w.thread.join(30)
    for bad in (deep, huge):  # (read with SQL: Client.get cannot decode these payloads either)
        assert one(conn, "SELECT status FROM tasks WHERE id = %s", bad) == "failed"
        assert "payload cannot be decoded" in one(conn, "SELECT last_error FROM tasks WHERE id = %s", bad)
        assert one(conn, "SELECT retry_count FROM tasks WHERE id = %s", bad) == 1  # failed at once
    assert all(client.get(i).status == "done" and client.get(i).retry_count == 0 for i in good)


def test_a_handler_that_cannot_be_called_fails_its_task_and_the_worker_goes_on(
        client: Client, reset: None) -> None:
    """Calling the handler raises (TypeError: no payload parameter) before any of its code runs; the
    inline path once let that escape into the claim's dispatch, leaving the task `running` and a
    burst worker waiting for it forever."""
    bad = client.enqueue("o_no_payload_param", {})
    good = client.enqueue_many("o_result", [{}] * 3)
    with BackgroundWorker(["o_no_payload_param", "o_result"], burst=True, concurrency=4) as w:
        w.thread.join(30)
        assert not w.thread.is_alive(), "the burst worker did not end"
    failed = client.get(bad)
    assert failed.status == "failed" and "TypeError" in (failed.last_error or "")
    assert all(client.get(i).status == "done" for i in good)


def test_a_row_the_runtime_cannot_start_costs_only_that_row(client: Client, conn: psycopg.Connection[Any],
                                                            reset: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug while starting one claimed row (here: reading its row raises) once escaped the claim's
    dispatch: the loop restarted, the row's slot was lost and a burst worker waited for it for ever. Now
    the other rows of the claim run, the worker ends, and the row is left to its lease (the rescuer)."""
    from jobqueue.runtime import dispatcher

    make = dispatcher.ClaimedTask

    def faulty(row: Any, payload: Any) -> Any:
        if isinstance(payload, dict) and payload.get("boom"):
            raise RuntimeError("a bug of the runtime")
        return make(row, payload)

    monkeypatch.setattr(dispatcher, "ClaimedTask", faulty)
    bad = client.enqueue("o_result", {"boom": True})
    good = client.enqueue_many("o_result", [{}] * 5)
    with BackgroundWorker(["o_result"], burst=True, concurrency=2) as w:
        w.thread.join(30)
        assert not w.thread.is_alive(), "the burst worker did not end"
    assert all(client.get(i).status == "done" for i in good)
    assert one(conn, "SELECT status FROM tasks WHERE id = %s", bad) == "running"  # its lease will expire


# ------------------------------------------------------------------ item 5: attempts, not ids


def test_own_task_reclaimed_never_runs_twice_at_once(client: Client, conn: psycopg.Connection[Any],
                                                     reset: None) -> None:
    overlaps.clear()
    tid = client.enqueue("o_overlap", {"s": 1.5})
    with BackgroundWorker(["o_overlap"], concurrency=4, maintenance=False) as w:
        wait_for(lambda: tid in _active, timeout=10)
        # As the rescuer does with an expired lease: the task goes back to the queue, and this same
        # worker claims it again (attempt 2) while attempt 1 still runs here.
        conn.execute("UPDATE tasks SET status = 'queued', worker_id = NULL, lease_expires_at = NULL, "
                     "run_at = now(), retry_count = retry_count + 1 WHERE id = %s", (tid,))
        conn.execute("SELECT pg_notify(%s, '')", (channel("o_overlap"),))
        wait_for(lambda: status(conn, tid) == "done", timeout=10)
        # The completer lets go of its batch when the statement's answer arrives, a moment after the
        # commit this connection already sees.
        assert w.worker is not None
        wait_for(lambda: w.worker is not None and w.worker.running_pairs() == [], timeout=5)
    assert overlaps == []
    t = client.get(tid)
    assert t.attempt == 2 and t.retry_count == 1


# ------------------------------------------------------------------ item 7: worker_id in every fence


@pytest.mark.parametrize("end", ["raise", "snooze", "progress"])
def test_a_stale_worker_cannot_write(client: Client, conn: psycopg.Connection[Any], reset: None, end: str) -> None:
    tid = client.enqueue("o_fenced", {"end": end})
    with BackgroundWorker(["o_fenced"], maintenance=False):
        wait_for(lambda: status(conn, tid) == "running", timeout=10)
        # The same attempt number handed to another worker (a claim lost in a server crash).
        conn.execute("UPDATE tasks SET worker_id = 'someone-else' WHERE id = %s", (tid,))
        time.sleep(1.8)
    t = row(conn, tid)
    assert t["status"] == "running" and t["worker_id"] == "someone-else"
    assert t["retry_count"] == 0 and t["last_error"] is None and t["progress"] == 0
    assert "late" not in t["progress_msg"] and "SNOOZE" not in t["progress_msg"]


# ------------------------------------------------------------------ item 11: cancel then error


@pytest.mark.parametrize("end", ["raise", "snooze"])
def test_cancel_requested_while_running_wins_over_error_and_snooze(client: Client, conn: psycopg.Connection[Any],
                                                                   reset: None, end: str) -> None:
    parent = client.enqueue("t_stubborn", {"s": 1.0, "end": end})
    child = client.enqueue("o_result", {}, depends_on=[parent])
    with BackgroundWorker(["t_stubborn"], maintenance=False):
        wait_for(lambda: status(conn, parent) == "running", timeout=10)
        assert client.cancel(parent) == {parent: "running"}
        wait_for(lambda: status(conn, parent) != "running", timeout=10)
    assert status(conn, parent) == "cancelled"
    assert status(conn, child) == "cancelled"
    assert "[Canceled]" in row(conn, parent)["progress_msg"]


# ------------------------------------------------------------------ item 9: abandoned threads count


def test_hard_timed_out_thread_keeps_its_slot(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    hung = client.enqueue("o_hard", {}, priority=10)
    nxt = client.enqueue("o_result", {})
    with BackgroundWorker(["o_hard", "o_result"], burst=True, concurrency=1) as w:
        w.thread.join(30)
    assert client.get(hung).status == "failed" and "hard timeout" in (client.get(hung).last_error or "")
    assert client.get(nxt).status == "done"
    gap = one(conn, "SELECT extract(epoch FROM n.started_at - h.started_at) FROM tasks h, tasks n "
                    "WHERE h.id = %s AND n.id = %s", hung, nxt)
    assert gap >= 1.5  # the next task waited for the hung thread to return, not for the hard timeout


def test_abandoned_threads_are_shown_until_they_return(client: Client, conn: psycopg.Connection[Any],
                                                       reset: None) -> None:
    """The heartbeat writes how many hard-timed-out threads still hold a slot; worker_health and
    `jobq stats --json` show it, and it goes back to 0 once the thread returns."""
    hung_release.clear()

    def abandoned() -> int:
        return int(one(conn, "SELECT abandoned FROM worker_health WHERE worker_id = 'w-stuck'"))

    try:
        tid = client.enqueue("o_hung", {})
        with BackgroundWorker(["o_hung"], name="w-stuck", concurrency=2, heartbeat_seconds=0.2):
            wait_for(lambda: status(conn, tid) == "failed", timeout=10)
            assert "hard timeout" in (client.get(tid).last_error or "")
            wait_for(lambda: abandoned() == 1, timeout=5)
            res = jobq_cli("stats", "--json")
            assert res.returncode == 0, res.stderr
            workers = {w["worker_id"]: w for w in json.loads(res.stdout)["workers"]}
            assert workers["w-stuck"]["abandoned"] == 1
            hung_release.set()
            wait_for(lambda: abandoned() == 0, timeout=5)
    finally:
        hung_release.set()


# ------------------------------------------------------------------ item 8: shutdown of sync handlers


def test_sigterm_keeps_a_running_sync_handler_owned(client: Client, conn: psycopg.Connection[Any], reset: None,
                                                    procs: list[Any]) -> None:
    tid = client.enqueue("t_stubborn", {"s": 4})
    p = spawn("t_stubborn", "--grace", "0.5")
    procs.append(p)
    wait_for(lambda: status(conn, tid) == "running", timeout=20)
    p.send_signal(signal.SIGTERM)
    time.sleep(2)  # well past the grace period; the thread still runs
    t = row(conn, tid)
    assert t["status"] == "running" and t["worker_id"] is not None  # not released to another worker
    assert p.wait(20) == 0
    t = row(conn, tid)
    assert t["status"] == "done" and t["retry_count"] == 0


def test_sigterm_kills_a_process_isolated_handler_then_releases(client: Client, conn: psycopg.Connection[Any],
                                                                reset: None, procs: list[Any]) -> None:
    tid = client.enqueue("t_proc_sleep", {"s": 60})
    p = spawn("t_proc_sleep", "--grace", "0.5")
    procs.append(p)
    wait_for(lambda: status(conn, tid) == "running", timeout=20)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    t = row(conn, tid)
    assert t["status"] == "queued" and t["retry_count"] == 0 and "released by worker shutdown" in t["progress_msg"]


# ------------------------------------------------------------------ item 1: lock order


@pytest.mark.parametrize("statement", ["finish_many", "progress_many"])
def test_statements_lock_rows_in_id_order(db_url: str, conn: psycopg.Connection[Any], reset: None,
                                          statement: str) -> None:
    low, high = (one(conn, "INSERT INTO tasks (type, status, worker_id, attempt, started_at, lease_expires_at) "
                           "VALUES ('o_result', 'running', 'w', 1, now(), now() + interval '1 h') RETURNING id")
                 for _ in range(2))
    conn.execute("UPDATE tasks SET progress_msg = 'moved' WHERE id = %s", (low,))  # low now lies after high
    q = RuntimeSQL.load(SCHEMA)
    holder = psycopg.connect(db_url)
    holder.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (high,))
    done = threading.Event()

    async def run() -> None:
        c = await asyncpg.connect(db_url)
        try:
            ids, attempts = [high, low], [1, 1]  # the input order is not the lock order
            if statement == "finish_many":
                await c.fetch(q.finish_many, ids, attempts, ["done"] * 2, [None] * 2, [None] * 2, ["x"] * 2,
                              [0.0] * 2, [0.0] * 2, 1000, "w")
            else:
                await c.fetch(q.progress_many, ids, attempts, [0.5] * 2, ["x"] * 2, 1000, "w")
        finally:
            await c.close()
            done.set()

    t = threading.Thread(target=asyncio.run, args=(run(),))
    t.start()
    try:
        time.sleep(0.5)  # the statement now waits for `high`
        assert not done.is_set()
        with pytest.raises(psycopg.errors.LockNotAvailable):  # it took `low` first
            conn.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE NOWAIT", (low,))
    finally:
        holder.rollback()
        holder.close()
        t.join(10)
    assert done.is_set()


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="JOBQ_TEST_PROFILE=full")
def test_no_deadlock_with_large_history_and_overlapping_writes(client: Client, conn: psycopg.Connection[Any],
                                                               reset: None) -> None:
    """300k history rows; completions, progress flushes and heartbeats of many running tasks overlap."""
    conn.execute("INSERT INTO tasks (type, status, finished_at, progress) "
                 "SELECT 'o_chatty', 'done', now(), 1 FROM generate_series(1, 300000)")
    conn.execute("ANALYZE tasks")
    deadlocks = one(conn, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    ids = client.enqueue_many("o_chatty", [{}] * 3000)
    fast = get_settings().model_copy(update={"progress_interval": 0.02})
    workers = [BackgroundWorker(["o_chatty"], concurrency=100, heartbeat_seconds=0.1, lease_seconds=5,
                                settings=fast) for _ in range(2)]
    for w in workers:
        w.__enter__()
    try:
        wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE id >= %s AND status = 'done'", ids[0])
                 == len(ids), timeout=300)
    finally:
        for w in workers:
            w.stop()
    time.sleep(1.5)  # backends report their statistics within a second
    conn.execute("SELECT pg_stat_clear_snapshot()")
    assert one(conn, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()") == deadlocks
    assert one(conn, "SELECT count(*) FROM tasks WHERE id >= %s AND (attempt <> 1 OR retry_count <> 0)", ids[0]) == 0


@task("o_chatty")
async def o_chatty(ctx: Context, payload: Any) -> Any:
    for i in range(20):
        ctx.progress(i / 20, "tick" if i % 5 == 0 else None)
        await asyncio.sleep(0.01)
