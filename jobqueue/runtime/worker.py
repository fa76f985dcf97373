"""The worker runtime: claim, dispatch, complete, heartbeat, rescue, cancel, shut down.

One asyncio loop per process. The moving parts, each a coroutine:

- the claimer takes up to the free slots in one statement (priority order, SKIP LOCKED), woken by
  NOTIFY, by a timer for the next scheduled task, by a freed slot while a backlog remains, or by the
  fallback poll;
- each claimed row is decoded on its own and runs as an Attempt (executor.py): an asyncio task for
  async handlers, a thread for sync ones, a child process with isolation; the executor returns an
  Ack and writes nothing;
- the completer (completer.py) writes every outcome kind in batches, one statement for all acks that
  arrived meanwhile, and releases or cancels their dependents in the same transaction;
- the progress writer (progress.py) flushes every running task's coalesced progress in one statement;
- the heartbeat renews all our leases in one statement, learns of cancels it may have missed, and
  runs the maintenance services (rescuer, pruner) when it wins their advisory lock;
- the listener keeps the LISTEN connection alive.

Every write about a task is guarded by its fencing token (id, attempt) and the worker id: a worker
that lost a task to the rescuer can no longer complete, fail or report progress on it, and its
handler is cancelled. Attempts are tracked by (id, attempt); this worker never runs two attempts of
one task at once. Statements that lock several task rows lock them in id order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from jobqueue import __version__, registry
from jobqueue.db.connect import normalize, redact_text, resolve_url
from jobqueue.db.queries import MaintenanceSQL, RuntimeSQL
from jobqueue.observe import metrics
from jobqueue.runtime.completer import Completer
from jobqueue.runtime.dispatcher import Dispatcher
from jobqueue.runtime.executor import Executor
from jobqueue.runtime.maintenance import pruner, rescuer
from jobqueue.runtime.progress import ProgressWriter
from jobqueue.settings import Settings, get_settings
from jobqueue.states import CancelReason, cancel_channel, type_channel

log = logging.getLogger("jobq.worker")

DB_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
             asyncpg.AdminShutdownError, TimeoutError, asyncpg.ConnectionDoesNotExistError,
             # a connection left mid-operation by a server restart ("cannot switch to state 12; another
             # operation is in progress"): the pool drops it on release; retry on another one
             asyncpg.InternalClientError)


@dataclass
class WorkerStats:
    claimed: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    rescued: int = 0
    claims: int = 0


class Worker:
    """Runs the handlers of `types` until stopped (or, with `burst`, until nothing is runnable)."""

    def __init__(
        self,
        types: Sequence[str],
        *,
        concurrency: int | None = None,
        name: str | None = None,
        burst: bool = False,
        url: str | None = None,
        settings: Settings | None = None,
        poll_seconds: float | None = None,
        lease_seconds: float | None = None,
        heartbeat_seconds: float | None = None,
        grace_seconds: float | None = None,
        maintenance: bool = True,
        isolation: str | None = None,
    ) -> None:
        self.settings = s = settings or get_settings()
        self.types = list(dict.fromkeys(types))
        self.specs = {t: registry.get_type(t) for t in self.types}  # unknown types fail here, at start
        self.concurrency = concurrency or s.concurrency
        self.burst = burst
        self.url = url or resolve_url(s)
        self.q = RuntimeSQL.load(s.schema_name)
        self.mq = MaintenanceSQL.load(s.schema_name)
        self.poll = poll_seconds if poll_seconds is not None else s.poll_seconds
        self.lease = lease_seconds if lease_seconds is not None else s.lease_seconds
        self.heartbeat_every = heartbeat_seconds if heartbeat_seconds is not None else s.heartbeat_seconds
        self.grace = grace_seconds if grace_seconds is not None else s.grace_seconds
        self.maintenance = maintenance
        self.executor = Executor(s, concurrency=self.concurrency, isolation=isolation)
        self.host = socket.gethostname()
        self.id = name or f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.limits = {t: min(self.specs[t].concurrency or self.concurrency, self.concurrency) for t in self.types}
        self.stats = WorkerStats()
        self.log_chars = s.progress_log_chars

        self.completer = Completer(self.q, worker_id=self.id, log_chars=self.log_chars, stats=self.stats,
                                   db=self._db, connection=self._handler_connection,
                                   on_requeued=self._wake_at)
        self.progress = ProgressWriter(self.q, worker_id=self.id, log_chars=self.log_chars,
                                       interval=s.progress_interval, db=self._db, on_rows=self._apply_flags)
        self.dispatcher = Dispatcher(self.specs, executor=self.executor, completer=self.completer,
                                     progress=self.progress, stats=self.stats, connection=self._handler_connection,
                                     freed=self._slot_freed, stopping=lambda: self._stopping)
        # What the fetcher counts: attempts running (by id and by type) and abandoned threads.
        self._running = self.dispatcher.running
        self._running_by_type = self.dispatcher.by_type
        self._abandoned = self.dispatcher.abandoned
        self._wake = asyncio.Event()
        self._backlog = True
        self._stopping: bool = False
        self._stopped = asyncio.Event()
        self._capped: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: asyncpg.Pool | None = None
        self._handler_pool: asyncpg.Pool | None = None
        self._handler_pool_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._signals = 0
        from jobqueue.runtime.listener import Listener

        channels = [type_channel(s.schema_name, t) for t in self.types] + [cancel_channel(s.schema_name)]
        listen_url = normalize(s.listen_url) if s.listen_url else self.url
        self.listener = Listener(listen_url, channels, self._on_notify, self._on_listen_connect,
                                 ping_seconds=max(self.poll, 1.0))

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._pool = await self._create_pool()
        self.progress.start()
        self._install_signals()
        await self._heartbeat_once()
        metrics.worker_info(self.id, self.types)
        self._tasks = [
            asyncio.create_task(self.listener.run(), name="jobq-listener"),
            asyncio.create_task(self.completer.run(), name="jobq-completer"),
            asyncio.create_task(self.progress.run(), name="jobq-progress"),
            asyncio.create_task(self._heartbeat_loop(), name="jobq-heartbeat"),
        ]
        log.info("worker %s started: types=%s concurrency=%d", self.id, ",".join(self.types), self.concurrency)
        try:
            await self._claim_loop()
        finally:
            await self._shutdown()
        return 0

    async def _create_pool(self, *, for_handlers: bool = False) -> asyncpg.Pool:
        """The runtime's pool (claims, completions, progress, heartbeats: 4 connections), or the pool
        handlers borrow from through ctx.connection() / ctx.transaction().

        The runtime's connections skip asyncpg's reset on release (UNLISTEN, RESET ALL, ... : one more
        round trip after every claim, measured at ~0.3 ms of each claim's latency); jobq never changes
        session state on them (claims use set_config(..., true), which ends with the transaction).
        Handlers' connections keep the reset: their code may change session state.
        """
        delay = 0.1
        while True:
            try:
                pool: asyncpg.Pool = await asyncpg.create_pool(
                    self.url, min_size=0 if for_handlers else 2,
                    max_size=min(self.concurrency, 16) if for_handlers else 4, timeout=10,
                    statement_cache_size=100 if self.settings.prepared_statements else 0,
                    reset=None if for_handlers else _keep_session,
                )
                return pool
            except DB_ERRORS as exc:
                if self.burst:
                    raise
                log.warning("database unavailable (%s); retrying in %.1fs", redact_text(str(exc)), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Not in the main thread (asyncio says RuntimeError, uvloop ValueError): the embedding
            # application owns the signals and calls stop().
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now; leases expire and the rescuer requeues our tasks")
            os._exit(1)
        log.info("signal %s: draining (grace %.0fs); send it again to exit at once", sig, self.grace)
        self.stop()

    def stop(self) -> None:
        """Stop claiming; running tasks get the grace period, then are released back to the queue."""
        self._stopping = True
        self._wake.set()

    async def _shutdown(self) -> None:
        await self.dispatcher.drain(self.grace if not self.burst else 0)
        await self.completer.flush()
        await self.progress.flush()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.listener.stop()
        self.executor.shutdown()
        if self._pool is not None:
            with contextlib.suppress(*DB_ERRORS, asyncpg.PostgresError):
                async with self._pool.acquire() as conn:
                    await conn.execute(self.q.worker_stopped, self.id)
            await self._pool.close()
        if self._handler_pool is not None:
            await self._handler_pool.close()
        self._stopped.set()

    async def _db(self, fn: Any, *args: Any) -> Any:
        """Run `fn(conn, *args)` until it succeeds: a database restart delays writes, never drops them."""
        assert self._pool is not None
        delay = 0.05
        while True:
            try:
                async with self._pool.acquire() as conn:
                    return await fn(conn, *args)
            except DB_ERRORS as exc:
                log.warning("database error (%s); retrying in %.2fs", redact_text(str(exc)), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------------ wake-up

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == cancel_channel(self.settings.schema_name):
            task_id, _, attempt = payload.partition(":")
            with contextlib.suppress(ValueError):
                r = self._running.get(int(task_id))
                if r is not None and not r.abandoned and (not attempt or int(attempt) == r.ctx.attempt):
                    self.executor.cancel(r, CancelReason.USER)
            return
        with contextlib.suppress(ValueError):
            when = float(payload)
            delay = when - time.time()
            if delay > 0.001:
                self._schedule_wake(delay)
                return
        self._backlog = True
        self._wake.set()

    def _on_listen_connect(self) -> None:
        metrics.LISTEN_RECONNECTS.inc() if self.listener.reconnects else None
        self._backlog = True
        self._wake.set()

    def _schedule_wake(self, delay: float) -> None:
        """Wake when a scheduled task becomes runnable, keeping only the earliest timer."""
        assert self._loop is not None
        when = self._loop.time() + delay
        if self._timer is not None and not self._timer.cancelled() and self._timer.when() <= when:
            return
        if self._timer is not None:
            self._timer.cancel()

        def fire() -> None:
            self._timer = None
            self._backlog = True
            self._wake.set()

        self._timer = self._loop.call_at(when, fire)

    # ------------------------------------------------------------------ claiming

    def _free(self) -> dict[str, int]:
        total = self.concurrency - len(self._running) - len(self._abandoned)
        return {t: max(0, min(total, self.limits[t] - self._running_by_type[t])) for t in self.types}

    async def _claim_loop(self) -> None:
        idle_claims = 0
        while not self._stopping:
            free = self._free()
            want = min(sum(free.values()), self.concurrency - len(self._running))
            if want <= 0 or not self._backlog:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll)
                except TimeoutError:
                    self._backlog = True
                self._wake.clear()
                continue
            try:
                rows = await self._claim(free, want)
            except DB_ERRORS as exc:
                log.warning("claim failed (%s); retrying", redact_text(str(exc)))
                await asyncio.sleep(0.2)
                continue
            for row in rows:
                self._dispatch(row)
            if rows:
                idle_claims = 0
                # Let a few slots free up before the next claim: one claim per handful of finished
                # tasks instead of one per task (a round trip each), at a cost of <= 1 ms of delay.
                if len(rows) == want:
                    await self._gather_slots()
                continue
            self._backlog = False
            await self._arm_timer()
            if self.burst:
                if self._running or self.completer.pending:
                    idle_claims = 0  # what runs now may release dependents or fail into a retry
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=0.05)
                    self._wake.clear()
                else:
                    await self.completer.flush()
                    idle_claims += 1
                    if idle_claims >= 2:  # two empty claims in a row with nothing running or unwritten
                        return
                self._backlog = True

    async def _gather_slots(self) -> None:
        target = max(1, self.concurrency // 4)
        deadline = time.monotonic() + 0.001
        while (self.concurrency - len(self._running) < target and time.monotonic() < deadline
               and not self._stopping):
            await asyncio.sleep(0)

    async def _claim(self, free: dict[str, int], want: int) -> list[asyncpg.Record]:
        assert self._pool is not None
        started = time.perf_counter()
        types = [t for t in self.types if free[t] > 0]
        counts = [free[t] for t in types]
        async with self._pool.acquire() as conn:
            capped = [t for t in types if t in self._capped]
            if capped:
                async with conn.transaction():
                    for t in sorted(capped):
                        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"jobq.cap.{t}")
                    for r in await conn.fetch(self.q.running_count, capped):
                        i = types.index(r["type"])
                        counts[i] = max(0, min(counts[i], r["max_running"] - r["running"]))
                    rows: list[asyncpg.Record] = await conn.fetch(
                        self.q.claim, types, counts, want, self.id, self.lease)
            else:
                rows = await conn.fetch(self.q.claim, types, counts, want, self.id, self.lease)
        self.stats.claims += 1
        metrics.observe_claim(len(rows), time.perf_counter() - started)
        return rows

    async def _arm_timer(self) -> None:
        """After an incomplete claim: set a timer for the earliest task scheduled later."""
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn:
                when = await conn.fetchval(self.q.next_run_at, self.types)
        except DB_ERRORS:
            return
        if when is not None:
            self._schedule_wake(max(0.0, when.timestamp() - time.time()))

    # ------------------------------------------------------------------ the running attempts

    def running_pairs(self) -> list[tuple[int, int]]:
        """The (id, attempt) pairs the heartbeat renews (see Dispatcher.running_pairs)."""
        return self.dispatcher.running_pairs()

    def _dispatch(self, row: asyncpg.Record) -> None:
        self.dispatcher.dispatch(row)

    def _apply_flags(self, rows: list[asyncpg.Record], asked: list[tuple[int, int]]) -> None:
        self.dispatcher.apply_flags(rows, asked)

    def _slot_freed(self) -> None:
        if self._backlog or not self._stopping:
            self._wake.set()

    def _wake_at(self, when: datetime) -> None:
        self._schedule_wake(max(0.0, when.timestamp() - time.time()))

    @contextlib.asynccontextmanager
    async def _handler_connection(self) -> AsyncIterator[Any]:
        """A connection of the handlers' pool, created on first use (most task types never ask)."""
        if self._handler_pool is None:
            async with self._handler_pool_lock:
                if self._handler_pool is None:
                    self._handler_pool = await self._create_pool(for_handlers=True)
        async with self._handler_pool.acquire() as conn:
            yield conn

    # ------------------------------------------------------------------ heartbeat and maintenance

    # ------------------------------------------------------------------ heartbeat and maintenance

    async def _heartbeat_once(self) -> None:
        pairs = self.running_pairs()
        ids = [i for i, _ in pairs]

        async def beat(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(
                self.q.heartbeat, self.id, self.host, os.getpid(), self.types, self.concurrency, __version__,
                self.lease, ids)
            self._capped = {r["type"] for r in await conn.fetch(self.q.capped_types, self.types)}
            return rows

        rows = await self._db(beat)
        self._apply_flags(rows, pairs)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_every * random.uniform(0.9, 1.0))
            await self._heartbeat_once()
            if self.maintenance:
                await self._maintain()

    async def _maintain(self) -> None:
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn:
                rescued = await rescuer.rescue(conn, self.mq, self.q, log_chars=self.log_chars)
                if rescued.requeued or rescued.failed or rescued.cancelled:
                    n = rescued.requeued + rescued.failed + rescued.cancelled
                    self.stats.rescued += n
                    metrics.RESCUED.inc(n)
                    log.warning("rescued %d task(s) with expired leases (%d requeued, %d failed, %d cancelled)",
                                n, rescued.requeued, rescued.failed, rescued.cancelled)
                await pruner.maybe_prune(conn, self.settings)
        except (*DB_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("maintenance skipped: %s", redact_text(str(exc)))


async def _keep_session(conn: Any) -> None:
    """Pool reset that keeps the session as it is (asyncpg still rolls back an open transaction)."""


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it is a dependency on Linux and macOS): the worker's hot loop spends
    much of its time in the event loop itself, and uvloop roughly halves that cost."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(types: Sequence[str], **kwargs: Any) -> tuple[int, WorkerStats]:
    """Run a worker in this process until it stops; returns the exit code and what it did."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        worker = Worker(types, **kwargs)
        return loop.run_until_complete(worker.run()), worker.stats
    finally:
        loop.close()
