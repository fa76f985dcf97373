"""The worker runtime: claim, dispatch, complete, heartbeat, rescue, cancel, shut down.

One asyncio loop per process. The moving parts, each a coroutine:

- the fetcher (fetcher.py) takes up to the free slots in one statement (priority order, SKIP LOCKED),
  woken by NOTIFY, by a timer for the next scheduled task (on the database's clock), by a freed slot
  while a backlog remains, or by the fallback poll;
- a claim also takes, for short handlers, the tasks its slots would finish while the next claim
  travels; they wait for a slot in the dispatcher (prefetch.py);
- each claimed row is decoded on its own and runs as an Attempt (executor.py): an asyncio task for
  async handlers, a thread for sync ones, a child process with isolation; the executor returns an
  Ack and writes nothing;
- the completer (completer.py) writes every outcome kind in batches, one statement for all acks that
  arrived meanwhile, and releases or cancels their dependents in the same transaction;
- the progress writer (progress.py) flushes every running task's coalesced progress in one statement;
- the heartbeat (heartbeat.py) renews our leases by (id, attempt) in one statement, confirms cancel
  requests, and runs the maintenance services (rescuer, pruner) when it wins their advisory lock;
- the listener keeps the LISTEN connection alive.

Every background loop runs under `supervise` (supervise.py): restarted with backoff after an
unexpected error, and the worker exits non-zero when one cannot recover. Every database call goes
through `_db`, which retries transient errors with the one backoff and logs an outage once.

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
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from jobqueue import registry
from jobqueue.db.connect import normalize, redact, resolve_url
from jobqueue.db.queries import MaintenanceSQL, RuntimeSQL
from jobqueue.observe import metrics
from jobqueue.runtime.completer import BATCH as COMPLETION_BATCH
from jobqueue.runtime.completer import Completer
from jobqueue.runtime.dispatcher import Dispatcher
from jobqueue.runtime.executor import Executor
from jobqueue.runtime.fetcher import Fetcher
from jobqueue.runtime.flow import FlowClaims
from jobqueue.runtime.heartbeat import Heartbeat
from jobqueue.runtime.pool import call, create_pool
from jobqueue.runtime.progress import ProgressWriter
from jobqueue.runtime.supervise import CONNECTION_ERRORS, Outage, quiet_asyncpg_pool, supervise
from jobqueue.settings import Settings, get_settings
from jobqueue.states import cancel_channel, finished_channel, type_channel

log = logging.getLogger("jobq.worker")


@dataclass
class WorkerStats:
    claimed: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    rescued: int = 0
    claims: int = 0
    # The most acks at once whose handler had returned but whose outcome was not committed yet
    # (bounded by Completer.bound: the fetcher stops claiming while the completer is behind).
    max_unwritten: int = 0


@dataclass(frozen=True)
class WorkerStatus:
    """What a worker tells whoever runs it, at once, from its event loop: ``event`` is ``"started"``,
    ``"draining"`` (the first stop signal) or ``"abandoning"`` (the second: the process exits right
    after the callback returns). The runner decides how to show it (the CLI prints one line)."""

    event: str
    worker_id: str
    types: tuple[str, ...]
    concurrency: int
    database: str  # the URL without its password
    running: tuple[int, ...]  # the tasks in flight, by id
    grace_left: float  # seconds the running tasks still get before they are released
    stats: WorkerStats


class Worker:
    """Runs the handlers of `types` until stopped (or, with `burst`, until nothing is runnable).

    `on_status` is called with a :class:`WorkerStatus` when the worker has started and on each stop
    signal (from the event loop; it must not block)."""

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
        on_status: Callable[[WorkerStatus], None] | None = None,
        completion_batch: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        self.settings = s = settings or get_settings()
        self._on_status = on_status
        self._drain_deadline: float | None = None
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
                                   on_requeued=self._wake_at, on_written=self._acks_written,
                                   batch_cap=completion_batch or COMPLETION_BATCH)
        self.progress = ProgressWriter(self.q, worker_id=self.id, log_chars=self.log_chars,
                                       interval=s.progress_interval, db=self._db, on_rows=self._apply_flags)
        self.dispatcher = Dispatcher(self.specs, executor=self.executor, completer=self.completer,
                                     progress=self.progress, stats=self.stats, connection=self._handler_connection,
                                     freed=self._slot_freed, stopping=lambda: self._stopping,
                                     concurrency=self.concurrency, limits=self.limits,
                                     prefetch=s.prefetch if prefetch is None else prefetch)
        # What the fetcher counts: attempts running (by id and by type) and abandoned threads.
        self._running = self.dispatcher.running
        self._running_by_type = self.dispatcher.by_type
        self._abandoned = self.dispatcher.abandoned
        self._stopping: bool = False
        self._stopped = asyncio.Event()
        self.outage = Outage()
        self._fatal: BaseException | None = None
        self.flow = FlowClaims(self.q, self.specs)
        self.fetcher = Fetcher(self)
        self.heartbeat = Heartbeat(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: asyncpg.Pool | None = None
        self._handler_pool: asyncpg.Pool | None = None
        self._handler_pool_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._signals = 0
        self._telling: asyncio.Task[None] | None = None
        from jobqueue.runtime.listener import Listener

        channels = [type_channel(s.schema_name, t) for t in self.types] + [cancel_channel(s.schema_name)]
        if self.flow.limited:  # a held-back key may start when a task of it finishes on another worker
            channels.append(finished_channel(s.schema_name))
        listen_url = normalize(s.listen_url) if s.listen_url else self.url
        self.listener = Listener(listen_url, channels, self._on_notify, self._on_listen_connect,
                                 ping_seconds=max(self.poll, 1.0), outage=self.outage)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        quiet_asyncpg_pool()
        self._pool = await self._create_pool()
        self.progress.start()
        self._install_signals()
        await self.heartbeat.beat()
        await self._db(self.flow.declare, self.id)
        metrics.worker_info(self.id, self.types)
        self._tasks = [
            asyncio.create_task(supervise(name, loop, self._on_fatal), name=f"jobq-{name}")
            for name, loop in (("listener", self.listener.run), ("completer", self.completer.run),
                               ("progress", self.progress.run), ("heartbeat", self.heartbeat.loop))
        ]
        log.info("worker %s started: types=%s concurrency=%d", self.id, ",".join(self.types), self.concurrency)
        self._tell("started")
        try:
            await supervise("claim", self.fetcher.run, self._on_fatal)
        finally:
            await self._shutdown()
        if self._fatal is not None:
            log.critical("worker %s stopped: a background loop could not recover", self.id)
            return 1
        return 0

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _on_fatal(self, exc: BaseException) -> None:
        """A supervised loop gave up: stop the whole worker (non-zero exit), never run half-alive."""
        self._fatal = exc
        self.stop()

    async def _create_pool(self, *, for_handlers: bool = False) -> asyncpg.Pool:
        return await create_pool(self.url, self.settings, self.outage, concurrency=self.concurrency,
                                 for_handlers=for_handlers, give_up=lambda: self.burst)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Not in the main thread (asyncio says RuntimeError, uvloop ValueError): the embedding
            # application owns the signals and calls stop().
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def status(self, event: str) -> WorkerStatus:
        """The worker as it is now (see WorkerStatus)."""
        grace = self._grace()
        if self._drain_deadline is not None:
            grace = max(0.0, self._drain_deadline - time.monotonic())
        return WorkerStatus(event, self.id, tuple(self.types), self.concurrency, redact(self.url),
                            tuple(sorted(a.ctx.id for a in self.dispatcher.owned())), grace, self.stats)

    def _tell(self, event: str) -> None:
        if self._on_status is not None:
            self._on_status(self.status(event))

    def _grace(self) -> float:
        return self.grace if not self.burst else 0.0

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now; leases expire and the rescuer requeues our tasks")
            self._tell("abandoning")
            os._exit(1)
        log.info("signal %s: draining (grace %.0fs); send it again to exit at once", sig, self._grace())
        self.stop()
        if self.fetcher.settled.is_set():
            self._tell("draining")
        else:
            self._telling = asyncio.get_running_loop().create_task(self._tell_draining())

    async def _tell_draining(self) -> None:
        """Say what drains once a claim in flight has handed over its rows (they are ours and run in the
        grace period): said at once, they would be missing from the line. A claim stuck in an outage
        delays the line by at most two seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.fetcher.settled.wait(), timeout=2.0)
        try:
            self._tell("draining")
        except Exception:  # the shutdown awaits this: a failed report (a closed stdout) must not stop the drain
            log.exception("worker %s: the draining report failed", self.id)

    def stop(self) -> None:
        """Stop claiming; running tasks get the grace period, then are released back to the queue."""
        self._stopping = True
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self._grace()
        self.fetcher.stop()

    async def _shutdown(self) -> None:
        if self._telling is not None:  # the draining line comes before what the drain does
            await self._telling
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self._grace()
        await self.dispatcher.drain(max(0.0, self._drain_deadline - time.monotonic()))
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
            with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
                async with self._pool.acquire() as conn:
                    await conn.execute(self.q.worker_stopped, self.id)
            await self._pool.close()
        if self._handler_pool is not None:
            await self._handler_pool.close()
        self._stopped.set()

    async def _db(self, fn: Any, *args: Any) -> Any:
        """Run `fn(conn, *args)` until it succeeds: a database restart, a full server or a deadlock
        delays writes, never drops them (transient errors only; anything else propagates)."""
        assert self._pool is not None
        return await call(self._pool, self.outage, fn, *args)

    # ------------------------------------------------------------------ wake-up

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == cancel_channel(self.settings.schema_name):
            self.heartbeat.cancel_hint(payload)
        elif channel == finished_channel(self.settings.schema_name):
            self.fetcher.on_finished()
        else:
            self.fetcher.on_type_notify(payload)

    def _on_listen_connect(self) -> None:
        metrics.LISTEN_RECONNECTS.inc() if self.listener.reconnects else None
        self.fetcher.on_listen_connect()
        self.heartbeat.listening()

    # ------------------------------------------------------------------ the running attempts

    def running_pairs(self) -> list[tuple[int, int]]:
        """The (id, attempt) pairs the heartbeat renews (see Dispatcher.running_pairs)."""
        return self.dispatcher.running_pairs()

    def _dispatch(self, rows: list[asyncpg.Record]) -> None:
        self.dispatcher.dispatch_many(rows)
        self.heartbeat.claimed(rows)

    def _apply_flags(self, rows: list[asyncpg.Record], asked: list[tuple[int, int]]) -> None:
        self.dispatcher.apply_flags(rows, asked)

    def _slot_freed(self, task_type: str) -> None:
        self.fetcher.slot_freed(task_type)

    def _acks_written(self) -> None:
        self.fetcher.room_freed()

    def _wake_at(self, when: datetime) -> None:
        """A task went back to the queue until `when` (a database time): wake for it then."""
        self.fetcher.wake_at(when.timestamp())

    @contextlib.asynccontextmanager
    async def _handler_connection(self) -> AsyncIterator[Any]:
        """A connection of the handlers' pool, created on first use (most task types never ask)."""
        if self._handler_pool is None:
            async with self._handler_pool_lock:
                if self._handler_pool is None:
                    self._handler_pool = await self._create_pool(for_handlers=True)
        async with self._handler_pool.acquire() as conn:
            yield conn


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
