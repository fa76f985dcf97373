"""The worker runtime against a real PostgreSQL: claiming, wake-up, retries, timeouts, progress,
leases and rescue, fencing, cancellation, shutdown, LISTEN reconnect."""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
from typing import Any

import psycopg
import pytest
from support import REPO, BackgroundWorker, one, spawn, status, wait_for

from jobqueue import Client
from jobqueue.observe import metrics

TESTS = str(REPO / "tests")


pytestmark = pytest.mark.usefixtures("runs_tables")



# ------------------------------------------------------------------ claiming


def test_priority_order_and_type_filter(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    low = client.enqueue("t_record", {}, priority=0)
    high = client.enqueue("t_record", {}, priority=10)
    mid = client.enqueue("t_record", {}, priority=5)
    other = client.enqueue("t_other", {}, priority=100)
    with BackgroundWorker(["t_record"], concurrency=1, burst=True) as w:
        w.thread.join(30)
    order = [r[0] for r in conn.execute("SELECT task_id FROM public.test_runs ORDER BY at, task_id")]
    assert order == [high, mid, low]
    assert status(conn, other) == "queued"


def test_no_task_runs_twice_two_processes(client: Client, conn: psycopg.Connection[Any], reset: None,
                                          procs: list[subprocess.Popen[str]]) -> None:
    n = 2000
    client.enqueue_many("t_record", [{} for _ in range(n)])
    for _ in range(2):
        procs.append(spawn("t_record", "--concurrency", "8", "--burst"))
    for p in procs:
        assert p.wait(180) == 0, p.stderr.read() if p.stderr else ""
    assert one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == n
    assert one(conn, "SELECT count(*) FROM public.test_runs") == n
    assert one(conn, "SELECT count(DISTINCT task_id) FROM public.test_runs") == n
    assert one(conn, "SELECT count(DISTINCT pid) FROM public.test_runs") == 2  # both did work


def test_notify_wakes_idle_worker_without_polling(client: Client, conn: psycopg.Connection[Any],
                                                   reset: None) -> None:
    with BackgroundWorker(["t_record"], poll_seconds=60) as w:
        assert w.worker is not None
        wait_for(lambda: w.worker is not None and w.worker.listener.connected.is_set())
        time.sleep(0.2)  # the first claim has found nothing; the worker now sleeps on its 60 s poll
        tid = client.enqueue("t_record", {})
        wait_for(lambda: status(conn, tid) == "done", timeout=3)
    lag = one(conn, "SELECT extract(epoch FROM started_at - created_at) FROM tasks WHERE id = %s", tid)
    assert lag < 1.0


def test_scheduled_task_starts_on_time(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    with BackgroundWorker(["t_record"], poll_seconds=60) as w:
        wait_for(lambda: w.worker is not None and w.worker.listener.connected.is_set())
        tid = client.enqueue("t_record", {}, delay=1.5)
        time.sleep(1.0)
        assert status(conn, tid) == "queued"
        wait_for(lambda: status(conn, tid) == "done", timeout=3)
    late = one(conn, "SELECT extract(epoch FROM started_at - run_at) FROM tasks WHERE id = %s", tid)
    assert 0 <= late < 0.3


def test_local_and_global_type_concurrency(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    conn.execute("INSERT INTO queues (type, max_running) VALUES ('t_capped', 2)")
    client.enqueue_many("t_capped", [{} for _ in range(8)])
    peak = 0
    with BackgroundWorker(["t_capped"], concurrency=10, burst=True) as w1, \
            BackgroundWorker(["t_capped"], concurrency=10, burst=True) as w2:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and w1.thread.is_alive() | w2.thread.is_alive():
            peak = max(peak, one(conn, "SELECT count(*) FROM tasks WHERE status = 'running'"))
            time.sleep(0.02)
    assert one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 8
    assert peak == 2


def test_burst_worker_waiting_only_on_acks_is_woken_by_their_commit(
    client: Client, conn: psycopg.Connection[Any], db_url: str, reset: None
) -> None:
    """A burst worker whose empty claim left only unwritten acks is woken by the commit that writes
    them (it claims again, or exits, at once); before, it slept out its 50 ms tick. A worker that
    is not in burst mode and saw an empty queue is not woken by a commit (nothing new to claim)."""
    import asyncio

    from jobqueue.runtime.executor import Ack, Outcome
    from jobqueue.runtime.worker import Worker

    ids = [client.enqueue("t_record", {}) for _ in range(2)]

    async def commit_acks(burst: bool) -> bool:
        w = Worker(["t_record"], url=db_url, concurrency=4, lease_seconds=60, burst=burst)
        w._pool = await w._create_pool()
        try:
            await w.heartbeat.beat()
            rows = await w._db(w.fetcher._claim, {"t_record": 1}, 1)
            assert len(rows) == 1
            w.fetcher.backlog = False  # as after the empty claim that found nothing more
            w.fetcher.wake.clear()
            w.completer.add(Ack(Outcome.DONE, rows[0]["id"], rows[0]["attempt"], "t_record", "Done."))
            assert not w.fetcher.wake.is_set()
            await w.completer.flush()
            assert w.completer.unwritten == 0 and status(conn, rows[0]["id"]) == "done"
            return w.fetcher.wake.is_set()
        finally:
            await w._pool.close()

    assert asyncio.run(commit_acks(burst=True)) is True
    assert asyncio.run(commit_acks(burst=False)) is False
    assert sorted(status(conn, i) for i in ids) == ["done", "done"]


# ------------------------------------------------------------------ outcomes


def test_retries_with_backoff_then_failure(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    tid = client.enqueue("t_fail", {})
    with BackgroundWorker(["t_fail"], poll_seconds=60, burst=False):
        wait_for(lambda: status(conn, tid) == "failed", timeout=15)
    t = client.get(tid)
    assert t.retry_count == 3 and t.progress == -1 and t.attempt == 3
    assert t.last_error is not None and "ValueError: transient trouble #3" in t.last_error
    assert "[ERROR]" in t.progress_msg and "(retry 1 of 2)" in t.progress_msg
    starts = [r[0] for r in conn.execute("SELECT at FROM public.test_runs WHERE task_id = %s ORDER BY at", (tid,))]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 2 and gaps[0] >= 0.09 and all(g < 2.0 for g in gaps)  # backoff, then on time


def test_transient_error_recovers(client: Client, reset: None) -> None:
    tid = client.enqueue("t_flaky", {})
    with BackgroundWorker(["t_flaky"], poll_seconds=60):
        wait_for(lambda: client.get(tid).status == "done", timeout=10)
    t = client.get(tid)
    assert t.result == {"attempt": 2} and t.retry_count == 1 and t.progress == 1


def test_non_retryable_error(client: Client, reset: None) -> None:
    tid = client.enqueue("t_fail_fast", {})
    with BackgroundWorker(["t_fail_fast"], burst=True) as w:
        w.thread.join(20)
    t = client.get(tid)
    assert t.status == "failed" and t.attempt == 1 and "unreadable" in (t.last_error or "")


def test_snooze_does_not_count_a_retry(client: Client, reset: None) -> None:
    tid = client.enqueue("t_snooze", {})
    with BackgroundWorker(["t_snooze"], poll_seconds=60):
        wait_for(lambda: client.get(tid).status == "done", timeout=10)
    t = client.get(tid)
    assert t.retry_count == 0 and t.attempt == 2 and "[SNOOZE]" in t.progress_msg


def test_soft_timeout(client: Client, reset: None) -> None:
    tid = client.enqueue("t_soft", {})
    started = time.monotonic()
    with BackgroundWorker(["t_soft"], burst=True) as w:
        w.thread.join(20)
    t = client.get(tid)
    assert t.status == "failed" and "soft timeout" in (t.last_error or "")
    assert time.monotonic() - started < 4


def test_hard_timeout_abandons_attempt(client: Client, reset: None) -> None:
    tid = client.enqueue("t_hard", {})
    with BackgroundWorker(["t_hard"], burst=True) as w:
        w.thread.join(20)
    t = client.get(tid)
    assert t.status == "failed" and "hard timeout" in (t.last_error or "")
    assert t.process_duration is not None and t.process_duration < 1.5


def test_progress_is_coalesced_and_final_value_written(client: Client, reset: None) -> None:
    before = metrics.PROGRESS_WRITES._value.get()
    tid = client.enqueue("t_progress", {"hold": 1.0})
    with BackgroundWorker(["t_progress"], burst=True):
        wait_for(lambda: abs(client.get(tid).progress - 0.37) < 1e-6, timeout=5)
        assert "final report" in client.get(tid).progress_msg
        wait_for(lambda: client.get(tid).status == "done", timeout=10)
    writes = metrics.PROGRESS_WRITES._value.get() - before
    assert 1 <= writes <= 12  # 10,001 calls in ~1 s: a few statements, not thousands
    log = client.get(tid).progress_msg
    assert len(log) <= 3000 and log.count("\n") < 100


# ------------------------------------------------------------------ leases, rescue, fencing


def test_kill_9_worker_task_rescued_and_completed_once(client: Client, conn: psycopg.Connection[Any],
                                                       reset: None, procs: list[subprocess.Popen[str]]) -> None:
    env = {"JOBQ_LEASE_SECONDS": "2", "JOBQ_HEARTBEAT_SECONDS": "0.5"}
    tid = client.enqueue("t_effect", {"sleep": 3})
    victim = spawn("t_effect", env=env)
    procs.append(victim)
    wait_for(lambda: status(conn, tid) == "running", timeout=20)
    wait_for(lambda: one(conn, "SELECT count(*) FROM public.test_runs") == 1, timeout=10)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    killed_at = time.monotonic()
    procs.append(spawn("t_effect", env=env))
    wait_for(lambda: status(conn, tid) == "done", timeout=30)
    # rescued within lease + heartbeat (+ the new worker's start-up), then completed once
    assert time.monotonic() - killed_at < 2 + 0.5 + 3 + 8
    t = client.get(tid)
    assert t.attempt == 2 and t.retry_count == 1 and "lost; task rescued" in t.progress_msg
    assert one(conn, "SELECT count(*) FROM public.test_effects WHERE task_id = %s", tid) == 1
    assert one(conn, "SELECT attempt FROM public.test_effects WHERE task_id = %s", tid) == 2


def test_zombie_cannot_complete_and_is_cancelled(client: Client, conn: psycopg.Connection[Any],
                                                 reset: None) -> None:
    tid = client.enqueue("t_effect", {"sleep": 2})
    with BackgroundWorker(["t_effect"], heartbeat_seconds=0.3, maintenance=False) as w:
        wait_for(lambda: one(conn, "SELECT count(*) FROM public.test_runs") == 1, timeout=10)
        # Another worker rescued and re-claimed the task: the attempt (fencing token) moved on.
        conn.execute("UPDATE tasks SET attempt = attempt + 1, worker_id = 'someone-else' WHERE id = %s", (tid,))
        assert w.worker is not None
        wait_for(lambda: w.worker is not None and not w.worker._running, timeout=5)  # handler cancelled
    t = client.get(tid)
    assert t.status == "running" and t.worker_id == "someone-else"  # untouched by the zombie
    assert one(conn, "SELECT count(*) FROM public.test_effects") == 0


# ------------------------------------------------------------------ cancellation


@pytest.mark.parametrize("ttype", ["t_sleep", "t_sync_sleep", "t_proc_sleep"])
def test_cancel_running_task(client: Client, conn: psycopg.Connection[Any], reset: None, ttype: str) -> None:
    tid = client.enqueue(ttype, {"s": 20})
    with BackgroundWorker([ttype]):
        wait_for(lambda: status(conn, tid) == "running", timeout=10)
        time.sleep(0.3)
        t0 = time.monotonic()
        assert client.cancel(tid) == {tid: "running"}
        wait_for(lambda: status(conn, tid) == "cancelled", timeout=5)
        assert time.monotonic() - t0 < 1.5
    t = client.get(tid)
    assert "[Canceled]" in t.progress_msg and t.last_error is None


def test_cancel_queued_task_never_runs(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    tid = client.enqueue("t_record", {})
    assert client.cancel(tid) == {tid: "cancelled"}
    with BackgroundWorker(["t_record"], burst=True) as w:
        w.thread.join(20)
    assert one(conn, "SELECT count(*) FROM public.test_runs") == 0


def test_cancel_whole_document(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    doc = one(conn, "INSERT INTO documents (name, size, format, kind, parser, pages, content_digest, uri) "
                    "VALUES ('a.pdf', 1, 'pdf', 'pdf', 'general', 4, 'x', '/nowhere/a.pdf') RETURNING id")
    ids = [client.enqueue("t_sleep", {"s": 20}, doc_id=doc) for _ in range(4)]
    with BackgroundWorker(["t_sleep"], concurrency=1):
        wait_for(lambda: any(status(conn, i) == "running" for i in ids))
        result = client.cancel(doc_id=doc)
        assert sorted(result.values()) == ["cancelled", "cancelled", "cancelled", "running"]
        wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE doc_id = %s AND status = 'cancelled'",
                             doc) == 4, timeout=5)


def test_process_isolation_survives_segfault(client: Client, reset: None) -> None:
    tid = client.enqueue("t_proc_crash", {})
    ok = client.enqueue("t_record", {})
    with BackgroundWorker(["t_proc_crash", "t_record"], burst=True) as w:
        w.thread.join(30)
    t = client.get(tid)
    assert t.status == "failed" and "signal 11" in (t.last_error or "")
    assert client.get(ok).status == "done"


# ------------------------------------------------------------------ shutdown


def test_sigterm_drains_then_releases(client: Client, conn: psycopg.Connection[Any], reset: None,
                                      procs: list[subprocess.Popen[str]]) -> None:
    short = client.enqueue("t_sleep", {"s": 0.5})
    long = client.enqueue("t_sleep", {"s": 60})
    p = spawn("t_sleep", "--grace", "1.5", "--concurrency", "2")
    procs.append(p)
    wait_for(lambda: status(conn, short) == "running" and status(conn, long) == "running", timeout=20)
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0
    assert status(conn, short) == "done"  # finished within the grace period
    t = client.get(long)
    assert t.status == "queued" and t.retry_count == 0 and "released by worker shutdown" in t.progress_msg


# ------------------------------------------------------------------ LISTEN resilience


def test_listen_reconnects_after_terminate_backend(client: Client, conn: psycopg.Connection[Any],
                                                   reset: None) -> None:
    with BackgroundWorker(["t_record"], poll_seconds=60) as w:
        assert w.worker is not None
        wait_for(lambda: w.worker is not None and w.worker.listener.connected.is_set())
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid() AND datname = current_database()")
        wait_for(lambda: w.worker is not None and w.worker.listener.reconnects >= 1, timeout=10)
        wait_for(lambda: w.worker is not None and w.worker.listener.connected.is_set(), timeout=10)
        tid = client.enqueue("t_record", {})
        wait_for(lambda: status(conn, tid) == "done", timeout=3)  # woken by NOTIFY, not the 60 s poll


def test_listen_and_pool_survive_server_restart(client: Client, conn: psycopg.Connection[Any], reset: None,
                                                embedded_home: Any) -> None:
    if embedded_home is None:
        pytest.skip("restarting the server needs the embedded PostgreSQL")
    from jobqueue.admin import embedded

    with BackgroundWorker(["t_record"], poll_seconds=60) as w:
        assert w.worker is not None
        wait_for(lambda: w.worker is not None and w.worker.listener.connected.is_set())
        embedded.stop(embedded_home, mode="fast")
        embedded.ensure_running(embedded_home)
        wait_for(lambda: w.worker is not None and w.worker.listener.reconnects >= 1, timeout=20)
        wait_for(lambda: w.worker is not None and w.worker.listener.connected.is_set(), timeout=20)
        with psycopg.connect(client.url, autocommit=True) as fresh:
            c2 = Client(client.url)
            tid = c2.enqueue("t_record", {})
            wait_for(lambda: status(fresh, tid) == "done", timeout=5)
            c2.close()
