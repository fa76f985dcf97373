"""Issue 12, target 7: a worker claims short tasks ahead of its free slots (runtime/prefetch.py), and a
task that waits here is protected like a running one: its lease is renewed, a cancel ends it without
running its handler, a shutdown or a long wait gives it back to the queue. On a real PostgreSQL, with
the worker in this process so the handlers can be held."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from support import BackgroundWorker, jobq_cli, one, status, wait_for

from jobqueue import Client, Context, task
from jobqueue.observe import metrics
from jobqueue.runtime import prefetch
from jobqueue.runtime.heartbeat import Heartbeat
from jobqueue.runtime.prefetch import Ahead

GATE = threading.Event()
RAN: list[int] = []


@task("t_ahead", max_retries=0)
async def t_ahead(ctx: Context, payload: Any) -> None:
    RAN.append(ctx.id)
    if payload.get("hold"):
        while not GATE.is_set():
            await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def fresh(clean: None) -> Iterator[None]:
    GATE.clear()
    RAN.clear()
    yield
    GATE.set()  # a failed test must not leave a handler holding its worker's thread
    # Every task a worker held was started and finished, or left it unstarted: none counts as in flight.
    assert metrics.TASKS.in_flight.get("t_ahead", 0) == 0


def worker_of(bw: BackgroundWorker) -> Any:
    assert bw.worker is not None
    return bw.worker


def prime(client: Client, conn: psycopg.Connection[Any], bw: BackgroundWorker) -> list[int]:
    """Run short tasks until the worker has seen its handler and claim times, then queue one task that
    holds the only slot and five short ones behind it, in one statement (so one claim takes them all);
    returns the five, once they wait for the slot in the worker."""
    client.enqueue_many("t_ahead", [{} for _ in range(20)])
    wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 20)
    ahead = worker_of(bw).dispatcher.ahead
    assert ahead.took.get("t_ahead") is not None and ahead.claim_seconds is not None
    ids = client.enqueue_many("t_ahead", [{"hold": True}] + [{} for _ in range(5)])
    hold, short = ids[0], ids[1:]
    wait_for(lambda: hold in RAN and len(ahead.waiting) == 5)
    assert [status(conn, t) for t in short] == ["running"] * 5
    return short


def test_short_handlers_at_concurrency_1_are_claimed_ahead(client: Client, conn: psycopg.Connection[Any]) -> None:
    """Without prefetch every task of a worker at concurrency 1 costs a claim of its own."""
    client.enqueue_many("t_ahead", [{} for _ in range(1000)])
    with BackgroundWorker(["t_ahead"], concurrency=1, burst=True, maintenance=False) as bw:
        bw.thread.join(60)
    w = worker_of(bw)
    assert one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 1000
    # Without prefetch: one claim per task (checked below). With it, ~10-60 tasks a claim; the bound is
    # loose because one slow handler (a GC pause under a loaded suite) lowers the depth for a while.
    assert w.stats.claims < 250, w.stats.claims
    assert sorted(RAN) == sorted(set(RAN)) and len(RAN) == 1000  # each ran once

    RAN.clear()
    client.enqueue_many("t_ahead", [{} for _ in range(200)])
    with BackgroundWorker(["t_ahead"], concurrency=1, burst=True, maintenance=False, prefetch=0) as bw:
        bw.thread.join(60)
    assert worker_of(bw).stats.claims >= 200  # prefetch=0: one claim per task


def test_unknown_handlers_are_not_claimed_ahead(client: Client, conn: psycopg.Connection[Any]) -> None:
    """A type whose handler this worker has never seen end may be long: nothing of it waits for a slot."""
    with BackgroundWorker(["t_ahead"], concurrency=1, maintenance=False) as bw:
        ids = client.enqueue_many("t_ahead", [{"hold": True}] + [{} for _ in range(5)])
        wait_for(lambda: ids[0] in RAN)
        assert len(worker_of(bw).dispatcher.ahead.waiting) == 0
        assert [status(conn, t) for t in ids[1:]] == ["queued"] * 5
        GATE.set()
        wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 6)


def test_tasks_claimed_ahead_keep_their_lease_and_run_in_claim_order(
        client: Client, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The slot is held for three leases; the rescuer would requeue a waiting task whose lease the
    heartbeat did not renew."""
    monkeypatch.setattr(prefetch, "MAX_WAIT", 60.0)
    with BackgroundWorker(["t_ahead"], name="pf", concurrency=1, lease_seconds=0.6, heartbeat_seconds=0.15) as bw:
        short = prime(client, conn, bw)
        attempts = [one(conn, "SELECT attempt FROM tasks WHERE id = %s", t) for t in short]
        for _ in range(3):
            time.sleep(0.6)
            rows = conn.execute("SELECT status, worker_id, attempt, lease_expires_at > now() FROM tasks "
                                "WHERE id = ANY(%s) ORDER BY id", (short,)).fetchall()
            assert rows == [("running", "pf", a, True) for a in attempts]
        GATE.set()
        wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 26)
    assert RAN[-5:] == short


@pytest.mark.parametrize("path", ["notify", "heartbeat"])
def test_a_cancelled_task_claimed_ahead_never_runs(client: Client, conn: psycopg.Connection[Any],
                                                   monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Confirmed from the NOTIFY's hint, or found by the beat when the NOTIFY never came."""
    monkeypatch.setattr(prefetch, "MAX_WAIT", 60.0)
    if path == "heartbeat":
        monkeypatch.setattr(Heartbeat, "cancel_hint", lambda self, payload: None)
    beat = 60.0 if path == "notify" else 0.2
    with BackgroundWorker(["t_ahead"], concurrency=1, heartbeat_seconds=beat, maintenance=False) as bw:
        short = prime(client, conn, bw)
        victim = short[2]
        client.cancel(victim)
        wait_for(lambda: status(conn, victim) == "cancelled", timeout=5)
        assert victim not in RAN and len(worker_of(bw).dispatcher.ahead.waiting) == 4
        GATE.set()
        wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 25)
    assert victim not in RAN


def test_shutdown_gives_tasks_claimed_ahead_back_at_once(client: Client, conn: psycopg.Connection[Any]) -> None:
    """They are released when the worker stops, not after the running handler's grace period."""
    with BackgroundWorker(["t_ahead"], concurrency=1, grace_seconds=30, maintenance=False) as bw:
        short = prime(client, conn, bw)
        loop = bw._loop
        assert loop is not None
        loop.call_soon_threadsafe(worker_of(bw).stop)
        wait_for(lambda: [status(conn, t) for t in short] == ["queued"] * 5, timeout=5)
        assert bw.thread.is_alive()  # the held handler still has its grace period
        GATE.set()
    assert not set(short) & set(RAN)
    msgs = [one(conn, "SELECT progress_msg FROM tasks WHERE id = %s", t) for t in short]
    assert all("released by worker shutdown" in m for m in msgs), msgs


def test_tasks_that_wait_too_long_are_released(client: Client, conn: psycopg.Connection[Any]) -> None:
    """The held handler outlasts prefetch.MAX_WAIT: the tasks behind it go back to the queue (another
    worker may have room), and this worker claims no more of the type ahead."""
    with BackgroundWorker(["t_ahead"], concurrency=1, heartbeat_seconds=0.2, maintenance=False) as bw:
        short = prime(client, conn, bw)
        wait_for(lambda: [status(conn, t) for t in short] == ["queued"] * 5, timeout=5)
        w = worker_of(bw)
        assert len(w.dispatcher.ahead.waiting) == 0 and w.dispatcher.ahead.took["t_ahead"] >= prefetch.MAX_WAIT
        msgs = [one(conn, "SELECT progress_msg FROM tasks WHERE id = %s", t) for t in short]
        assert all("released unstarted: waited over 1s for a free slot" in m for m in msgs), msgs
        GATE.set()
        wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 26)
    assert sorted(RAN[-5:]) == short


# ------------------------------------------------------------------ how many (no database)


def test_room_is_what_the_slots_finish_during_a_claim() -> None:
    a = Ahead(prefetch=50)
    free, limits = {"a": 1, "b": 2, "c": 0, "d": 3}, {"a": 4, "b": 4, "c": 4, "d": 4}
    assert a.room(free, limits, ()) == dict.fromkeys(free, 0)  # no claim timed yet
    a.claimed(0.002)
    a.ended("a", 0.001)  # 4 slots x 2 ms / 1 ms
    a.ended("b", 0.000_01)  # far more than the cap
    a.ended("c", 0.000_01)  # no free slot
    assert a.room(free, limits, ()) == {"a": 8, "b": 42, "c": 0, "d": 0}  # d: never seen
    assert a.room(free, limits, {"b"}) == {"a": 8, "b": 0, "c": 0, "d": 0}
    a.ended("a", 10.0)  # one long attempt: 0.2 x 10 s
    assert a.room(free, limits, ())["a"] == 0
    assert Ahead(prefetch=0).room(free, limits, ()) == dict.fromkeys(free, 0)


def test_a_negative_prefetch_is_one_error_line() -> None:
    r = jobq_cli("worker", "--types", "greet", "--import", "examples.quickstart", "--prefetch", "-1")
    assert r.returncode != 0
    assert (r.stdout + r.stderr).strip() == "error: --prefetch must be 0 or more"
