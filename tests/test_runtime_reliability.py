"""Issue 11, the runtime's half, on a real PostgreSQL: transient errors retried by SQLSTATE, a
heartbeat that never waits on a row lock, cancel NOTIFYs confirmed in the table, no busy re-claim
loops (paused or capped types, a clock ahead of the database), caps that hold from the next claim,
one log line per outage, supervised background loops, and views that read columns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import handlers
import psycopg
import pytest
from support import BackgroundWorker, channel, one, status, wait_for

from jobqueue import Client, get_settings
from jobqueue.runtime.progress import ProgressWriter
from jobqueue.runtime.worker import Worker

assert handlers  # registers the t_* task types


pytestmark = pytest.mark.usefixtures("runs_tables")



def started(w: BackgroundWorker) -> bool:
    return w.worker is not None and w.worker.listener.connected.is_set() and w.worker.stats.claims > 0


# ------------------------------------------------------------------ transient errors (items 1, 3)


@pytest.mark.parametrize("state", ["40P01", "40001", "55P03", "57014", "53300", "08006", "57P01"])
def test_db_retries_transient_sqlstates(db_url: str, state: str) -> None:
    """Deadlock, serialization failure, lock timeout, statement timeout, too many connections,
    connection failure and admin shutdown, raised by the server, are retried: the call succeeds."""
    raise_it = f"DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{state}'; END $$"

    async def go() -> tuple[int, int]:
        worker = Worker(["t_record"], url=db_url)
        worker._pool = await worker._create_pool()
        calls = 0

        async def flaky(conn: Any) -> int:
            nonlocal calls
            calls += 1
            if calls < 3:
                await conn.execute(raise_it)
            return int(await conn.fetchval("SELECT 1"))

        try:
            return await asyncio.wait_for(worker._db(flaky), 10), calls
        finally:
            await worker._pool.close()

    assert asyncio.run(go()) == (1, 3)


def test_db_does_not_retry_a_real_bug(db_url: str) -> None:
    """A non-transient error (here a syntax error) propagates to the loop's supervisor at once."""

    async def go() -> None:
        worker = Worker(["t_record"], url=db_url)
        worker._pool = await worker._create_pool()
        try:
            await worker._db(lambda conn: conn.execute("SELEKT 1"))
        finally:
            await worker._pool.close()

    with pytest.raises(Exception, match="syntax"):
        asyncio.run(go())


def test_worker_waits_out_too_many_connections(client: Client, conn: psycopg.Connection[Any], db_url: str,
                                              reset: None) -> None:
    """53300 (a role's connection limit, or a full server) while the worker connects: it retries
    instead of crashing, and runs the task once connections are free again (item 3)."""
    from support import SCHEMA

    role = f"jobq_limited_{uuid.uuid4().hex[:6]}"
    conn.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 4')
    conn.execute(f'GRANT USAGE ON SCHEMA "{SCHEMA}" TO "{role}"')
    conn.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA "{SCHEMA}" TO "{role}"')
    conn.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA "{SCHEMA}" TO "{role}"')
    parts = urlsplit(db_url)  # the embedded server's URL names its socket in the query: keep it
    as_role = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}"))
    held = [psycopg.connect(as_role) for _ in range(4)]
    try:
        tid = client.enqueue("t_record", {})
        with BackgroundWorker(["t_record"], url=as_role) as w:
            time.sleep(2.0)  # every connection attempt of the worker meets 53300 meanwhile
            assert w.thread.is_alive() and w.error is None
            for c in held:
                c.close()
            held = []
            wait_for(lambda: status(conn, tid) == "done", timeout=20)
        assert w.error is None
    finally:
        for c in held:
            c.close()
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


# ------------------------------------------------------------------ heartbeat vs row locks (items 1, 6)


def test_heartbeat_does_not_wait_on_a_locked_row(client: Client, conn: psycopg.Connection[Any], db_url: str,
                                                  reset: None) -> None:
    """A transaction holding one running task's row (a producer adding a child, an operator's UPDATE)
    must not stop the renewal of the worker's other leases."""
    a = client.enqueue("t_sleep", {"s": 6})
    b = client.enqueue("t_sleep", {"s": 6})
    with BackgroundWorker(["t_sleep"], lease_seconds=1.5, heartbeat_seconds=0.3, maintenance=False):
        wait_for(lambda: status(conn, a) == "running" and status(conn, b) == "running")
        with psycopg.connect(db_url) as holder:
            holder.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (a,))
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                left = one(conn, "SELECT extract(epoch FROM lease_expires_at - now()) FROM tasks WHERE id = %s", b)
                assert left > 0, "the lease of the unlocked task expired while another row was locked"
                time.sleep(0.1)
            holder.rollback()
        # the locked task's lease is renewed by a later beat
        wait_for(lambda: one(conn, "SELECT lease_expires_at > now() + interval '1 second' FROM tasks "
                                   "WHERE id = %s", a), timeout=3)


def test_heartbeat_does_not_wait_on_its_worker_row(client: Client, conn: psycopg.Connection[Any], db_url: str,
                                                    reset: None) -> None:
    """The worker's own row locked elsewhere (e.g. a completer transaction waiting on something else)
    must not hold back the lease renewals either."""
    tid = client.enqueue("t_sleep", {"s": 5})
    with BackgroundWorker(["t_sleep"], name="hb-row", lease_seconds=1.5, heartbeat_seconds=0.3, maintenance=False):
        wait_for(lambda: status(conn, tid) == "running")
        with psycopg.connect(db_url) as holder:
            holder.execute("SELECT 1 FROM workers WHERE id = 'hb-row' FOR UPDATE")
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                left = one(conn, "SELECT extract(epoch FROM lease_expires_at - now()) FROM tasks WHERE id = %s", tid)
                assert left > 0, "the lease expired while the worker's row was locked"
                time.sleep(0.1)
            holder.rollback()


def test_heartbeat_renews_by_attempt_not_by_id(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    """The lease belongs to an attempt: once the row carries another attempt of the same task (this
    worker re-claimed it after losing it), the old attempt's beat must not keep that lease alive."""
    tid = client.enqueue("t_sleep", {"s": 4})
    with BackgroundWorker(["t_sleep"], lease_seconds=1.5, heartbeat_seconds=0.2, maintenance=False):
        wait_for(lambda: status(conn, tid) == "running")
        conn.execute("UPDATE tasks SET attempt = attempt + 1, lease_expires_at = now() + interval '0.5 s' "
                     "WHERE id = %s", (tid,))
        time.sleep(1.2)
        assert one(conn, "SELECT lease_expires_at < now() FROM tasks WHERE id = %s", tid), \
            "a beat for attempt 1 renewed attempt 2's lease"


# ------------------------------------------------------------------ cancel hints (item 10)


def test_cancel_notify_from_a_role_without_grants_cancels_nothing(
        client: Client, conn: psycopg.Connection[Any], db_url: str, reset: None) -> None:
    role = f"jobq_nobody_{uuid.uuid4().hex[:6]}"
    conn.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        tid = client.enqueue("t_sleep", {"s": 1.5})
        with BackgroundWorker(["t_sleep"]):
            wait_for(lambda: status(conn, tid) == "running")
            attempt = one(conn, "SELECT attempt FROM tasks WHERE id = %s", tid)
            parts = urlsplit(db_url)
            as_role = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
            with psycopg.connect(as_role, autocommit=True) as hostile:
                for payload in (f"{tid}:{attempt}", str(tid)):
                    hostile.execute("SELECT pg_notify(%s, %s)", (channel("cancel"), payload))
            wait_for(lambda: status(conn, tid) != "running", timeout=10)
        assert status(conn, tid) == "done"
    finally:
        conn.execute(f'DROP ROLE "{role}"')


def test_real_cancel_still_stops_the_handler(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    tid = client.enqueue("t_sleep", {"s": 30})
    with BackgroundWorker(["t_sleep"], heartbeat_seconds=60):
        wait_for(lambda: status(conn, tid) == "running")
        t0 = time.monotonic()
        client.cancel(tid)
        wait_for(lambda: status(conn, tid) == "cancelled", timeout=5)
        assert time.monotonic() - t0 < 10, "the NOTIFY (confirmed), not the 60 s heartbeat, stopped it"



def test_cancel_between_claim_and_dispatch_is_not_lost(client: Client, conn: psycopg.Connection[Any], reset: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The task is `running` in the table as soon as the claim commits; the worker knows it only once
    it has dispatched the claim's rows. A cancel NOTIFY heard in between must still stop the handler
    at once, not at the next beat (60 s here)."""
    claimed = threading.Event()
    real = Worker._dispatch
    later: list[asyncio.Task[None]] = []

    async def dispatch_later(self: Worker, rows: list[Any]) -> None:
        await asyncio.sleep(1.0)  # the NOTIFY is heard meanwhile
        real(self, rows)

    def held(self: Worker, rows: list[Any]) -> None:
        if not rows or claimed.is_set():
            real(self, rows)
            return
        claimed.set()
        later.append(asyncio.get_running_loop().create_task(dispatch_later(self, rows)))

    monkeypatch.setattr(Worker, "_dispatch", held)
    with BackgroundWorker(["t_sleep"], heartbeat_seconds=60) as w:
        # Listening, and past the claim that follows the LISTEN's connect (whose rows are checked anyway).
        wait_for(lambda: started(w) and w.worker is not None and not w.worker.heartbeat._unheard_claim)
        tid = client.enqueue("t_sleep", {"s": 30})
        assert claimed.wait(10)
        assert status(conn, tid) == "running"
        client.cancel(tid)
        wait_for(lambda: status(conn, tid) == "cancelled", timeout=5)


def test_cancel_sent_before_the_listen_connects_is_not_lost(client: Client, conn: psycopg.Connection[Any],
                                                            reset: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker claims from its start, before its LISTEN is up: a cancel sent then is heard by nobody.
    When the LISTEN connects, the attempts running are checked, not left to the beat (60 s here)."""
    from jobqueue.runtime.listener import Listener

    real = Listener._connect

    async def slow_connect(self: Listener) -> None:
        await asyncio.sleep(2.0)
        await real(self)

    monkeypatch.setattr(Listener, "_connect", slow_connect)
    tid = client.enqueue("t_sleep", {"s": 30})
    with BackgroundWorker(["t_sleep"], heartbeat_seconds=60) as w:
        wait_for(lambda: one(conn, "SELECT count(*) FROM public.test_runs WHERE task_id = %s", tid) == 1)
        assert w.worker is not None and not w.worker.listener.connected.is_set()
        client.cancel(tid)
        wait_for(lambda: status(conn, tid) == "cancelled", timeout=8)


# ------------------------------------------------------------------ busy loops (items 15, 16, 17)


def claims_during(w: BackgroundWorker, seconds: float) -> int:
    assert w.worker is not None
    before = w.worker.stats.claims
    time.sleep(seconds)
    return w.worker.stats.claims - before


def test_paused_type_does_not_spin(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    conn.execute("INSERT INTO queues (type, paused) VALUES ('t_record', true)")
    client.enqueue_many("t_record", [{} for _ in range(5)])
    with BackgroundWorker(["t_record"], poll_seconds=1.0) as w:
        wait_for(lambda: started(w))
        assert claims_during(w, 2.0) <= 6
    assert one(conn, "SELECT count(*) FROM tasks WHERE status = 'queued'") == 5


def test_type_at_its_cap_does_not_spin(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    conn.execute("INSERT INTO queues (type, max_running) VALUES ('t_sleep', 1)")
    client.enqueue_many("t_sleep", [{"s": 4} for _ in range(3)])
    with BackgroundWorker(["t_sleep"], concurrency=5, poll_seconds=1.0) as w:
        wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'running'") == 1)
        assert claims_during(w, 2.0) <= 6
        assert one(conn, "SELECT count(*) FROM tasks WHERE status = 'running'") == 1


def test_clock_ahead_of_the_database_does_not_spin(client: Client, conn: psycopg.Connection[Any], reset: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 5.0)
    with BackgroundWorker(["t_record"], poll_seconds=10) as w:
        wait_for(lambda: started(w))
        tid = client.enqueue("t_record", {}, delay=3.0)
        assert claims_during(w, 2.0) <= 6
        wait_for(lambda: status(conn, tid) == "done", timeout=5)
    late = one(conn, "SELECT extract(epoch FROM started_at - run_at) FROM tasks WHERE id = %s", tid)
    assert 0 <= late < 0.5


def test_new_cap_applies_on_the_next_claim(client: Client, conn: psycopg.Connection[Any], reset: None) -> None:
    peak = 0
    with BackgroundWorker(["t_sleep"], concurrency=10, heartbeat_seconds=60) as w:
        wait_for(lambda: started(w))
        conn.execute("INSERT INTO queues (type, max_running) VALUES ('t_sleep', 2)")
        client.enqueue_many("t_sleep", [{"s": 0.5} for _ in range(8)])
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and one(conn, "SELECT count(*) FROM tasks WHERE status <> 'done'"):
            peak = max(peak, one(conn, "SELECT count(*) FROM tasks WHERE status = 'running'"))
            time.sleep(0.02)
    assert peak == 2
    assert one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 8


# ------------------------------------------------------------------ outages (item 22)


class Proxy:
    """A TCP proxy to the test server that can be cut (the database 'down') and restored, or frozen:
    every connection open while frozen goes half-open for good (bytes swallowed, nothing closed, as
    when a NAT or firewall forgets the connection); connections made after `thaw()` work. A close
    still goes through (the server then ends its session and its locks; over a real half-open link
    that is left to the server's keepalive or idle_in_transaction_session_timeout). The target is a
    (host, port) or, for the embedded server, the path of its Unix socket."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.frozen_now = False
        self.conns: list[socket.socket] = []
        self.dead: set[socket.socket] = set()  # connections that swallow what they receive
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                if isinstance(self.target, str):
                    server = socket.socket(socket.AF_UNIX)
                    server.connect(self.target)
                else:
                    server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
                if self.frozen_now:
                    self.dead.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                if a not in self.dead:
                    b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.conns.clear()

    def restore(self) -> None:
        self.up = True

    def freeze(self) -> None:
        with self.lock:
            self.frozen_now = True
            self.dead.update(self.conns)

    def thaw(self) -> None:
        self.frozen_now = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy(db_url: str) -> Iterator[tuple[Proxy, str]]:
    parts = urlsplit(db_url)
    query = dict(parse_qsl(parts.query))
    if "host" in query:  # the embedded server: a Unix socket in that directory
        p = Proxy(f"{query['host']}/.s.PGSQL.{query.get('port', '5432')}")
    else:
        p = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0] + "@" if len(netloc) == 2 else ""
    yield p, urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{p.port}", query=""))
    p.close()


def test_outage_logs_one_line_each_way(client: Client, conn: psycopg.Connection[Any], reset: None,
                                       proxy: tuple[Proxy, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    p, url = proxy
    with BackgroundWorker(["t_record"], url=url, poll_seconds=0.2, heartbeat_seconds=0.3) as w:
        wait_for(lambda: started(w))
        p.cut()
        time.sleep(4)
        p.restore()
        tid = client.enqueue("t_record", {})
        wait_for(lambda: status(conn, tid) == "done", timeout=20)
        wait_for(lambda: any("database back after" in r.getMessage() for r in caplog.records), timeout=10)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith(("jobq", "asyncpg"))]
    assert len([m for m in messages if "database unreachable" in m]) == 1, messages
    assert len([m for m in messages if "database back after" in m]) == 1, messages
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("asyncpg")]
    assert len([m for m in messages if "retrying" in m]) <= 3, messages


def test_half_open_connection_times_out_and_the_task_completes(
        client: Client, conn: psycopg.Connection[Any], db_url: str, reset: None, proxy: tuple[Proxy, str]) -> None:
    """Item 6: the connection carrying a task's completion goes half-open mid-statement (no byte goes
    through, nothing is closed). Without a command timeout the completer would wait forever for the
    answer, and no later task would be recorded; with one (2 s here) the statement fails, is retried,
    and tasks complete once connections work again. (A batch of successes is one statement outside a
    transaction block: the server commits it when the lock is released, whether or not its answer
    gets through, like a COMMIT whose answer is lost; the retry then finds the row done.)"""
    p, url = proxy
    settings = get_settings().model_copy(update={"command_timeout_seconds": 2.0})
    with BackgroundWorker(["t_record"], url=url, settings=settings, poll_seconds=0.5, heartbeat_seconds=0.5,
                          lease_seconds=60) as w:
        wait_for(lambda: started(w))
        tid = client.enqueue("t_record", {"sleep": 0.3})
        wait_for(lambda: status(conn, tid) == "running")
        with psycopg.connect(db_url) as holder:
            # Hold the task's row so the completion is in flight, on the server, when the link dies.
            holder.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (tid,))
            wait_for(lambda: one(conn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                       "AND datname = current_database()") == 1, timeout=10)
            p.freeze()
            holder.rollback()
        time.sleep(3)
        assert w.thread.is_alive()
        p.thaw()
        wait_for(lambda: status(conn, tid) == "done", timeout=20)
        after = client.enqueue("t_record", {})
        wait_for(lambda: status(conn, after) == "done", timeout=20)
        assert one(conn, "SELECT count(*) FROM public.test_runs WHERE task_id = %s", tid) == 1
    assert w.error is None


# ------------------------------------------------------------------ supervision


def test_a_loop_that_cannot_recover_stops_the_worker_non_zero(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def broken(self: ProgressWriter) -> None:
        raise RuntimeError("progress writer bug")

    monkeypatch.setattr(ProgressWriter, "run", broken)

    async def go() -> int:
        worker = Worker(["t_record"], url=db_url)
        return await asyncio.wait_for(worker.run(), 30)

    assert asyncio.run(go()) == 1
    crashes = [r for r in caplog.records if "background loop progress crashed" in r.getMessage()]
    assert len(crashes) == 5 and crashes[0].exc_info is not None


def test_a_loop_that_crashes_once_is_restarted(client: Client, conn: psycopg.Connection[Any], reset: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    original = ProgressWriter.run
    calls = 0

    async def once_broken(self: ProgressWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("transient bug")
        await original(self)

    monkeypatch.setattr(ProgressWriter, "run", once_broken)
    tid = client.enqueue("t_progress", {"hold": 1.0})
    with BackgroundWorker(["t_progress"]):
        wait_for(lambda: status(conn, tid) == "done", timeout=10)
    assert calls == 2
    assert one(conn, "SELECT progress FROM tasks WHERE id = %s", tid) == 1


# ------------------------------------------------------------------ views read columns (migration 0004)


def test_rescue_sets_requeue_reason_and_the_views_read_it(client: Client, conn: psycopg.Connection[Any],
                                                          reset: None) -> None:
    tid = client.enqueue("t_record", {})
    conn.execute("UPDATE tasks SET status = 'running', worker_id = 'gone', attempt = 1, started_at = now(), "
                 "lease_expires_at = now() - interval '1 second' WHERE id = %s", (tid,))
    with BackgroundWorker(["t_other"], heartbeat_seconds=0.2):
        wait_for(lambda: one(conn, "SELECT requeue_reason FROM tasks WHERE id = %s", tid) == "lost")
    # The message text no longer decides: a handler error that merely reads like a rescue is an error.
    other = client.enqueue("t_record", {})
    conn.execute("UPDATE tasks SET status = 'queued', retry_count = 1, requeue_reason = 'error', "
                 "last_error = 'worker x lost (lease expired)' WHERE id = %s", (other,))
    errors = dict(conn.execute("SELECT error, tasks FROM failures WHERE type = 't_record'").fetchall())
    assert errors.get("worker lost (lease expired)") == 1
    assert "worker x lost (lease expired)" in errors


def test_stale_worker_threshold_is_the_workers_lease(conn: psycopg.Connection[Any], reset: None) -> None:
    conn.execute("INSERT INTO workers (id, host, pid, types, concurrency, lease_seconds, last_seen) VALUES "
                 "('short', 'h', 1, '{t}', 1, 5, now() - interval '10 seconds'), "
                 "('long', 'h', 2, '{t}', 1, 120, now() - interval '60 seconds')")
    states = dict(conn.execute("SELECT worker_id, state FROM worker_health").fetchall())
    assert states == {"short": "stale", "long": "alive"}


def test_heartbeat_records_the_lease(conn: psycopg.Connection[Any], reset: None) -> None:
    with BackgroundWorker(["t_record"], lease_seconds=12):
        wait_for(lambda: one(conn, "SELECT count(*) FROM workers WHERE lease_seconds = 12") == 1)
