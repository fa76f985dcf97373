"""Group commit (issue 12, target 4): concurrent enqueue() calls share one statement and one commit.

Every test runs on both clients: threads on the sync Client, coroutines on one AsyncClient (run on an
event loop of their own, so the test can act while they wait). Grouping is made deterministic by
parking the first call's statement on a lock another connection holds: the calls made meanwhile queue
up, and the lock's release sends them all in the next statement. That they shared one commit is read
from the rows themselves: rows inserted by one transaction have one xmin.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from support import wait_for

from jobqueue import AsyncClient, Client, DatabaseUnavailable, InvalidPayload, TaskSpec, UnknownTaskType, task

K = 10  # calls parked behind the first one


@task("gc_plain")
async def gc_plain(ctx: Any, payload: Any) -> None:
    return None


class Side:
    """One client of either kind; `enqueue` starts a call and returns its future at once."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.threads = concurrent.futures.ThreadPoolExecutor(max_workers=2 * K + 8)
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.loop_thread.start()
        self.client: Any = Client(url) if kind == "sync" else AsyncClient(url)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Future[Any]:
        method = getattr(self.client, name)
        if self.kind == "sync":
            return self.threads.submit(method, *args, **kwargs)
        return asyncio.run_coroutine_threadsafe(method(*args, **kwargs), self.loop)

    def enqueue(self, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.call("enqueue", *args, **kwargs)

    def traced_enqueue(self, span: str, *args: Any, **kwargs: Any) -> Future[Any]:
        """enqueue() inside a span of its own, current where the call runs."""
        from opentelemetry import trace

        tracer = trace.get_tracer("jobq-group-tests")
        if self.kind == "sync":
            def call() -> Any:
                with tracer.start_as_current_span(span):
                    return self.client.enqueue(*args, **kwargs)
            return self.threads.submit(call)

        async def acall() -> Any:
            with tracer.start_as_current_span(span):
                return await self.client.enqueue(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(acall(), self.loop)

    def waiting(self) -> int:
        return int(self.client._group.waiting())

    def run(self, fn: Callable[[], Any]) -> Any:
        """fn() where the client's calls run: a worker thread, or the loop (a coroutine function)."""
        if self.kind == "sync":
            return self.threads.submit(fn).result(30)
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(30)

    def close(self) -> None:
        if self.kind == "sync":
            self.threads.submit(self.client.close).result()  # the connections are per thread
            self.client.close()
        else:
            asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result(30)
        self.threads.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join()
        self.loop.close()


@pytest.fixture(params=["sync", "async"])
def side(request: pytest.FixtureRequest, db_url: str, clean: None) -> Iterator[Side]:
    s = Side(request.param, db_url)
    try:
        yield s
    finally:
        s.close()


def lock_waiters(conn: psycopg.Connection[Any]) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND pid <> pg_backend_pid()").fetchall()]


class Parked:
    """The tasks table locked by another connection: the first call's statement waits on it, and the
    calls made meanwhile queue up behind it (`queue` waits until `n` have)."""

    def __init__(self, db_url: str, conn: psycopg.Connection[Any], side: Side) -> None:
        self.locker = psycopg.connect(db_url)
        self.locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        self.conn, self.side = conn, side

    def first(self, *args: Any, **kwargs: Any) -> Future[Any]:
        fut = self.side.enqueue(*args, **kwargs)
        wait_for(lambda: lock_waiters(self.conn))
        return fut

    def queue(self, n: int) -> None:
        wait_for(lambda: self.side.waiting() == n)

    def release(self) -> None:
        self.locker.close()


@pytest.fixture
def parked(db_url: str, conn: psycopg.Connection[Any], side: Side) -> Iterator[Parked]:
    p = Parked(db_url, conn, side)
    try:
        yield p
    finally:
        p.release()


def xmins(conn: psycopg.Connection[Any], ids: list[int]) -> int:
    """How many transactions wrote these rows."""
    row = conn.execute("SELECT count(DISTINCT xmin::text) FROM tasks WHERE id = ANY(%s)", (ids,)).fetchone()
    assert row is not None
    return int(row[0])


def test_waiting_calls_share_one_statement_and_one_commit(side: Side, parked: Parked,
                                                          conn: psycopg.Connection[Any]) -> None:
    first = parked.first("gc_plain", {"i": -1})
    at = datetime(2031, 1, 1, tzinfo=UTC)
    futures = [side.enqueue("gc_plain", {"i": i}, priority=i, labels=[f"l{i}", "all"] if i % 2 else None,
                            run_at=at if i == 3 else None, owner=f"o{i}") for i in range(K)]
    parked.queue(K)
    parked.release()
    first_id = first.result(30)
    ids = [f.result(30) for f in futures]
    stats = side.client.group_stats
    assert (stats.calls, stats.statements, stats.largest) == (K + 1, 2, K)
    assert len(set(ids)) == K and first_id not in ids
    assert xmins(conn, ids) == 1
    assert xmins(conn, [first_id, *ids]) == 2
    for i, task_id in enumerate(ids):  # each caller got the id of its own row, with its own fields
        payload, priority, labels, owner, run_at, status = conn.execute(
            "SELECT payload, priority, labels, owner, run_at, status FROM tasks WHERE id = %s",
            (task_id,)).fetchone() or ()
        assert (payload, priority, owner, status) == ({"i": i}, i, f"o{i}", "queued")
        assert labels == ([f"l{i}", "all"] if i % 2 else [])
        assert (run_at == at) == (i == 3)


def test_each_call_of_a_group_keeps_its_own_trace_context(side: Side, parked: Parked,
                                                          conn: psycopg.Connection[Any]) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # settable once a process
        trace.set_tracer_provider(TracerProvider())
    first = parked.first("gc_plain", {"i": -1})
    futures = [side.traced_enqueue(f"request {i}", "gc_plain", {"i": i}) for i in range(4)]
    plain = side.enqueue("gc_plain", {"i": 4})
    parked.queue(5)
    parked.release()
    first.result(30)
    ids = [f.result(30) for f in futures]
    contexts = [conn.execute("SELECT trace_context FROM tasks WHERE id = %s", (i,)).fetchone() for i in ids]
    parents = [c[0]["traceparent"] for c in contexts if c and c[0]]
    assert len(parents) == 4 and len({p.split("-")[1] for p in parents}) == 4  # four traces, one a call
    assert conn.execute("SELECT trace_context FROM tasks WHERE id = %s", (plain.result(30),)).fetchone() == (None,)
    assert xmins(conn, [*ids, plain.result(30)]) == 1


def test_a_lone_call_goes_alone_at_once(side: Side, conn: psycopg.Connection[Any]) -> None:
    ids = [side.enqueue("gc_plain", {"i": i}).result(30) for i in range(3)]
    stats = side.client.group_stats
    assert (stats.calls, stats.statements, stats.largest) == (3, 3, 1)
    assert xmins(conn, ids) == 3


def test_many_concurrent_callers_are_durable_when_their_call_returns(side: Side, db_url: str) -> None:
    """Every call's row is committed, seen from another connection, the moment the call returns."""
    callers, each = 16, 15
    if side.kind == "sync":
        def caller(c: int) -> list[bool]:
            with psycopg.connect(db_url, autocommit=True) as other:
                return [other.execute("SELECT 1 FROM tasks WHERE id = %s",
                                      (side.client.enqueue("gc_plain", {"c": c, "i": i}),)).fetchone() is not None
                        for i in range(each)]
        seen = [f.result(60) for f in [side.threads.submit(caller, c) for c in range(callers)]]
    else:
        async def acaller(c: int, other: psycopg.AsyncConnection[Any]) -> list[bool]:
            found = []
            for i in range(each):
                task_id = await side.client.enqueue("gc_plain", {"c": c, "i": i})
                cur = await other.execute("SELECT 1 FROM tasks WHERE id = %s", (task_id,))
                found.append(await cur.fetchone() is not None)
            return found

        async def all_callers() -> list[list[bool]]:
            others = [await psycopg.AsyncConnection.connect(db_url, autocommit=True) for _ in range(callers)]
            try:
                return await asyncio.gather(*(acaller(c, o) for c, o in enumerate(others)))
            finally:
                for o in others:
                    await o.close()
        seen = side.run(all_callers)
    assert all(all(s) for s in seen)
    stats = side.client.group_stats
    assert stats.calls == callers * each
    assert stats.statements < stats.calls  # some calls shared a statement (16 callers at once)


def test_dedupe_keys_in_a_group_give_what_lone_calls_give(side: Side, db_url: str,
                                                           conn: psycopg.Connection[Any]) -> None:
    live = conn.execute(
        "INSERT INTO tasks (type, dedupe_key) VALUES ('gc_plain', 'held') RETURNING id").fetchone()
    assert live is not None
    parked = Parked(db_url, conn, side)
    first = parked.first("gc_plain", {"i": -1})
    keys = ["same", "held", "same", None, "other", "same"]
    futures = [side.enqueue("gc_plain", {"i": i}, dedupe_key=k) for i, k in enumerate(keys)]
    parked.queue(len(keys))
    parked.release()
    first.result(30)
    ids = [f.result(30) for f in futures]
    assert ids[0] == ids[2] == ids[5]  # the first of the key's calls inserted, the others got its id
    assert ids[1] == live[0]  # a live task's key: its id, as a lone call gets
    assert len({ids[0], ids[1], ids[3], ids[4]}) == 4
    assert side.client.group_stats.statements == 2
    parked.release()
    # and lone calls now agree with what the group returned
    assert side.enqueue("gc_plain", dedupe_key="same").result(30) == ids[0]


def test_a_call_the_server_refuses_fails_alone(side: Side, parked: Parked, conn: psycopg.Connection[Any]) -> None:
    """A doc_id naming no document passes every check of the client; only the database refuses it
    (foreign key). The shared statement rolls back whole, then each call runs alone."""
    first = parked.first("gc_plain", {"i": -1})
    futures = [side.enqueue("gc_plain", {"i": i}, doc_id=987654 if i == 4 else None) for i in range(K)]
    parked.queue(K)
    parked.release()
    first.result(30)
    with pytest.raises(InvalidPayload, match="rejected by the database"):
        futures[4].result(30)
    ids = [f.result(30) for i, f in enumerate(futures) if i != 4]
    assert len(set(ids)) == K - 1
    assert conn.execute("SELECT count(*) FROM tasks WHERE doc_id IS NOT NULL").fetchone() == (0,)
    # the first, the shared statement that was refused, then each of the K calls alone
    assert side.client.group_stats.statements == 2 + K


def test_a_malformed_call_fails_before_joining_the_queue(side: Side, parked: Parked) -> None:
    first = parked.first("gc_plain", {"i": -1})
    good = [side.enqueue("gc_plain", {"i": i}) for i in range(3)]
    unknown = side.enqueue("bad type!", {})  # a type name the database would refuse (an unregistered
    # but valid name is enqueued: its handler may live in another process)
    malformed = side.enqueue("gc_plain", {"x": float("nan")})
    with pytest.raises(UnknownTaskType):
        unknown.result(30)
    with pytest.raises(InvalidPayload):
        malformed.result(30)
    parked.queue(3)
    parked.release()
    first.result(30)
    assert len({f.result(30) for f in good}) == 3
    assert side.client.group_stats.calls == 4


def test_connection_lost_mid_group_fails_every_call_of_it(side: Side, parked: Parked,
                                                          conn: psycopg.Connection[Any]) -> None:
    first = parked.first("gc_plain", {"i": -1})
    futures = [side.enqueue("gc_plain", {"i": i}) for i in range(K)]
    parked.queue(K)
    gone = lock_waiters(conn)
    conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (gone,))
    with pytest.raises(DatabaseUnavailable):
        first.result(30)
    # the group's statement goes next, on another connection, and waits on the lock too
    victims = wait_for(lambda: [p for p in lock_waiters(conn) if p not in gone])
    conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (victims,))
    for f in futures:
        with pytest.raises(DatabaseUnavailable):
            f.result(30)
    parked.release()
    assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (0,)  # nothing half-written
    assert side.client.group_stats.statements == 2
    assert side.enqueue("gc_plain").result(30) > 0  # the client recovers


def test_calls_in_the_callers_transaction_or_with_parents_are_not_grouped(side: Side, db_url: str,
                                                                          conn: psycopg.Connection[Any]) -> None:
    parent = side.enqueue("gc_plain").result(30)
    child = side.enqueue("gc_plain", depends_on=[parent]).result(30)
    assert side.client.group_stats.calls == 1  # the child locked its parent in a transaction of its own
    assert conn.execute("SELECT pending_deps FROM tasks WHERE id = %s", (child,)).fetchone() == (1,)
    if side.kind == "sync":
        def rolled_back() -> int:
            with psycopg.connect(db_url) as mine:  # a transaction opens implicitly
                task_id = int(side.client.enqueue("gc_plain", connection=mine))
                mine.rollback()
            return task_id
        task_id = side.run(rolled_back)
    else:
        import asyncpg

        async def arolled_back() -> int:
            mine = await asyncpg.connect(db_url)
            try:
                tx = mine.transaction()
                await tx.start()
                task_id = int(await side.client.enqueue("gc_plain", connection=mine))
                await tx.rollback()
                return task_id
            finally:
                await mine.close()
        task_id = side.run(arolled_back)
    assert conn.execute("SELECT count(*) FROM tasks WHERE id = %s", (task_id,)).fetchone() == (0,)
    assert side.client.group_stats.calls == 1


def test_a_caller_cancelled_while_waiting_writes_nothing(db_url: str, conn: psycopg.Connection[Any],
                                                         clean: None) -> None:
    s = Side("async", db_url)
    p = Parked(db_url, conn, s)
    try:
        first = p.first("gc_plain", {"i": -1})
        futures = [s.enqueue("gc_plain", {"i": i}) for i in range(3)]
        p.queue(3)
        futures[1].cancel()
        wait_for(lambda: futures[1].done())
        p.release()
        first.result(30)
        ids = [futures[0].result(30), futures[2].result(30)]
        assert len(set(ids)) == 2
        payloads = [r[0]["i"] for r in conn.execute("SELECT payload FROM tasks ORDER BY id").fetchall()]
        assert payloads == [-1, 0, 2]
        assert s.client.group_stats.largest == 2
    finally:
        p.release()
        s.close()


def test_group_commit_off_sends_each_call_alone(db_url: str, clean: None) -> None:
    for client in (Client(db_url, group_commit=False), AsyncClient(db_url, group_commit=False)):
        assert client.group_stats is None
    with Client(db_url, group_commit=False) as c:
        a, b = c.enqueue_many("gc_plain", [TaskSpec({"i": 1}, dedupe_key="m1"), TaskSpec({"i": 2}, dedupe_key="m1")],
                              labels=["x", "y"])
        assert a == b and c.get(a).labels == ["x", "y"]
        assert xmins_of(c, [c.enqueue("gc_plain"), c.enqueue("gc_plain")]) == 2


def xmins_of(client: Client, ids: list[int]) -> int:
    return xmins(client._own(), ids)


# ---------------------------------------------------------------- the sync client's loop thread


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "jobq-enqueue" and t.is_alive()]


def parked_group(side: Side, parked: Parked, n: int) -> list[int]:
    """`n` calls queued behind a parked one, then sent: their ids (one statement of the loop thread)."""
    first = parked.first("gc_plain", {"i": -1})
    futures = [side.enqueue("gc_plain", {"i": i}) for i in range(n)]
    parked.queue(n)
    parked.locker.rollback()  # the lock goes, the connection stays for the next parking
    first.result(30)
    return [f.result(30) for f in futures]


def test_the_sync_clients_loop_thread_runs_only_for_waiting_calls_and_stops_on_close(
        db_url: str, conn: psycopg.Connection[Any], clean: None) -> None:
    before = len(loop_threads())
    s = Side("sync", db_url)
    for i in range(3):  # one after the other: each goes alone, on its own thread's connection
        s.enqueue("gc_plain", {"i": i}).result(30)
    assert len(loop_threads()) == before and s.client._sender is None
    p = Parked(db_url, conn, s)
    try:
        ids = parked_group(s, p, 4)
        assert len(loop_threads()) == before + 1 and xmins(conn, ids) == 1
        s.run(s.client.close)
        assert len(loop_threads()) == before and s.client._sender is None
        p.locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        again = parked_group(s, p, 4)  # closed, the client still works: a new loop when calls wait
        assert len(loop_threads()) == before + 1 and xmins(conn, again) == 1
    finally:
        p.release()
        s.close()
    assert len(loop_threads()) == before


def forked(fn: Callable[[], str]) -> Callable[[], str]:
    """Run fn() in a forked child now; the returned function waits for the child and gives fn's text."""
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(write, fn().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)

    def result() -> str:
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        if done == (0, 0):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's enqueues did not return")
        assert os.waitstatus_to_exitcode(done[1]) == 0
        text = os.read(read, 100).decode()
        os.close(read)
        return text
    return result


def test_a_forked_child_enqueues_on_connections_a_loop_and_a_pool_of_its_own(
        db_url: str, conn: psycopg.Connection[Any], clean: None) -> None:
    """The child has none of the parent's threads, and the parent's sockets are not its own: it must
    not close them (that ends the parent's sessions), send on them, or wait on the parent's group."""
    s = Side("sync", db_url)
    p = Parked(db_url, conn, s)
    try:
        parked_group(s, p, 4)  # the parent's loop thread and pool exist
        s.client.enqueue("gc_plain")  # and a connection of this (the forking) thread
        mine = s.client._own().info.backend_pid

        def close_then_enqueue() -> str:
            s.client.close()  # what it holds is the parent's
            s.client.enqueue("gc_plain")
            return str(s.client._own().info.backend_pid)

        assert int(forked(close_then_enqueue)()) != mine
        s.client.enqueue("gc_plain")
        assert s.client._own().info.backend_pid == mine  # the parent's session was not ended

        def threads_at_once() -> str:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda i: s.client.enqueue("gc_plain", {"i": 1000 + i}), range(80)))
            return str(len(set(got)))

        p.locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        first = p.first("gc_plain", {"i": -1})  # forked while a lone call is in flight in the parent
        child = forked(threads_at_once)
        p.locker.rollback()
        first.result(30)
        assert child() == "80"
        p.locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        ids = parked_group(s, p, 4)  # the parent's loop and pool still work
        assert xmins(conn, ids) == 1
    finally:
        p.release()
        s.close()


def test_waiting_calls_fail_rather_than_sleep_when_no_loop_thread_can_start(
        db_url: str, conn: psycopg.Connection[Any], clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobqueue.client import loopthread

    def refuse(self: Any, fn: Any) -> None:
        raise RuntimeError("can't start new thread")

    s = Side("sync", db_url)
    p = Parked(db_url, conn, s)
    try:
        with monkeypatch.context() as m:
            m.setattr(loopthread.LoopThread, "start_soon", refuse)
            first = p.first("gc_plain", {"i": -1})
            futures = [s.enqueue("gc_plain", {"i": i}) for i in range(3)]
            p.queue(3)
            p.locker.rollback()
            first_id = first.result(30)  # the lone call committed: its id, not the others' error
            for f in futures:
                with pytest.raises(RuntimeError, match="can't start new thread"):
                    f.result(30)
        assert conn.execute("SELECT array_agg(id) FROM tasks").fetchone() == ([first_id],)
        p.locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        assert len(set(parked_group(s, p, 3))) == 3  # the group is not left waiting on a flush
    finally:
        p.release()
        s.close()
