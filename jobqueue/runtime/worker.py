"""The worker runtime: claim, dispatch, complete, heartbeat, rescue, cancel, shut down.

One asyncio loop per process. The moving parts, each a coroutine:

- the fetcher (fetcher.py) takes up to the free slots in one statement (priority order, SKIP LOCKED),
  woken by NOTIFY, by a timer for the next scheduled task (on the database's clock), by a freed slot
  while a backlog remains, or by the fallback poll;
- each claimed task runs as an asyncio task (async handlers) or in a thread (sync handlers);
- the completer writes finished tasks in batches (one statement for all that finished meanwhile),
  and releases their dependents in the same transaction;
- the progress writer flushes every running task's coalesced progress in one statement;
- the heartbeat (heartbeat.py) renews our leases by (id, attempt) in one statement, confirms cancel
  requests, and runs the maintenance services (rescuer, pruner) when it wins their advisory lock;
- the listener keeps the LISTEN connection alive.

Every background loop runs under `supervise` (supervise.py): restarted with backoff after an
unexpected error, and the worker exits non-zero when one cannot recover. Every database call goes
through `_db`, which retries transient errors with the one backoff and logs an outage once.

Every write about a task is guarded by its fencing token (id, attempt): a worker that lost a task to
the rescuer can no longer complete, fail or report progress on it, and its handler is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import socket
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import ValidationError

from jobqueue import registry
from jobqueue.db.connect import normalize, redact_text, resolve_url
from jobqueue.db.queries import MaintenanceSQL, RuntimeSQL
from jobqueue.errors import Cancelled, Fail, LeaseLost, Snooze
from jobqueue.observe import metrics
from jobqueue.runtime.context import ClaimedTask, Context
from jobqueue.runtime.fetcher import Fetcher
from jobqueue.runtime.heartbeat import Heartbeat
from jobqueue.runtime.pool import call, create_pool
from jobqueue.runtime.supervise import CONNECTION_ERRORS, Outage, quiet_asyncpg_pool, supervise
from jobqueue.settings import Settings, get_settings
from jobqueue.states import cancel_channel, type_channel

log = logging.getLogger("jobq.worker")



@dataclass
class _Running:
    ctx: Context
    spec: registry.TaskType
    started: float
    future: asyncio.Future[Any] | None = None
    abandoned: bool = False


@dataclass
class _Done:
    id: int
    attempt: int
    result: str | None
    line: str


@dataclass
class WorkerStats:
    claimed: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    rescued: int = 0
    claims: int = 0


def _json_result(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _take_pending(ctx: Context) -> tuple[float | None, str]:
    """The task's pending progress and message lines, with any password in a postgres URL removed:
    a handler's messages end up in progress_msg, which every dashboard shows."""
    value, lines = ctx.take_pending()
    return value, redact_text(lines) if lines else lines


def _short_traceback(exc: BaseException, frames: int = 6) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-frames)
    text = "".join(tb)
    return text[-4000:]


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
        # "process" runs every sync handler in a killable child process, whatever its @task says.
        self.isolation = isolation
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="jobq-handler")
        self.host = socket.gethostname()
        self.id = name or f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.limits = {t: min(self.specs[t].concurrency or self.concurrency, self.concurrency) for t in self.types}
        self.stats = WorkerStats()
        self.log_chars = s.progress_log_chars

        self._running: dict[int, _Running] = {}
        self._running_by_type = dict.fromkeys(self.types, 0)
        self._done: list[_Done] = []
        self._done_event = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._dirty: set[int] = set()
        self._stopping = False
        self._stopped = asyncio.Event()
        self.outage = Outage()
        self._fatal: BaseException | None = None
        self.fetcher = Fetcher(self)
        self.heartbeat = Heartbeat(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: asyncpg.Pool | None = None
        self._handler_pool: asyncpg.Pool | None = None
        self._handler_pool_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._handles: set[asyncio.Task[Any]] = set()
        self._signals = 0
        from jobqueue.runtime.listener import Listener

        channels = [type_channel(s.schema_name, t) for t in self.types] + [cancel_channel(s.schema_name)]
        listen_url = normalize(s.listen_url) if s.listen_url else self.url
        self.listener = Listener(listen_url, channels, self._on_notify, self._on_listen_connect,
                                 ping_seconds=max(self.poll, 1.0), outage=self.outage)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        quiet_asyncpg_pool()
        self._pool = await self._create_pool()
        self._install_signals()
        await self.heartbeat.beat()
        metrics.worker_info(self.id, self.types)
        self._tasks = [
            asyncio.create_task(supervise(name, loop, self._on_fatal), name=f"jobq-{name}")
            for name, loop in (("listener", self.listener.run), ("completer", self._completer),
                               ("progress", self._progress_writer), ("heartbeat", self.heartbeat.loop))
        ]
        log.info("worker %s started: types=%s concurrency=%d", self.id, ",".join(self.types), self.concurrency)
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
        self.fetcher.stop()

    async def _shutdown(self) -> None:
        deadline = time.monotonic() + (self.grace if not self.burst else 0)
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = list(self._running.values())
        if leftover:
            for r in leftover:
                r.ctx.request_cancel("shutdown")
                if r.future is not None and not r.future.done() and r.spec.is_async:
                    r.future.cancel()
            await self._db(self._release, [r.ctx for r in leftover])
            log.info("released %d running task(s) back to the queue", len(leftover))
        await self._flush_done()
        await self._flush_progress()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.listener.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
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
        else:
            self.fetcher.on_type_notify(payload)

    def _on_listen_connect(self) -> None:
        metrics.LISTEN_RECONNECTS.inc() if self.listener.reconnects else None
        self.fetcher.on_listen_connect()

    # ------------------------------------------------------------------ running handlers

    def _dispatch(self, row: asyncpg.Record) -> None:
        spec = self.specs[row["type"]]
        task = ClaimedTask(
            id=row["id"], type=row["type"], priority=row["priority"], payload=json.loads(row["payload"]),
            attempt=row["attempt"], retry_count=row["retry_count"], max_retries=row["max_retries"],
            created_at=row["created_at"], run_at=row["run_at"], doc_id=row["doc_id"], batch_id=row["batch_id"],
            from_page=row["from_page"], to_page=row["to_page"], owner=row["owner"], labels=list(row["labels"]),
            digest=row["digest"],
        )
        ctx = Context(task, log=log, transaction=self._complete_tx, on_progress=self._progress_dirty,
                      connection=self._handler_connection)
        running = _Running(ctx=ctx, spec=spec, started=time.monotonic())
        self._running[task.id] = running
        self._running_by_type[task.type] += 1
        self.stats.claimed += 1
        metrics.started(task.type, task.run_at)
        if row["cancel_requested"]:
            ctx.request_cancel("user")
        # The running map holds the task's record; the set keeps the asyncio task itself alive.
        handle = asyncio.create_task(self._execute(running), name=f"jobq-task-{task.id}")
        self._handles.add(handle)
        handle.add_done_callback(self._handles.discard)

    def _progress_dirty(self, ctx: Context) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running_loop = asyncio.get_running_loop()
        except RuntimeError:
            running_loop = None
        if running_loop is loop:
            self._dirty.add(ctx.id)
        else:
            loop.call_soon_threadsafe(self._dirty.add, ctx.id)

    def _cancel(self, r: _Running, reason: str) -> None:
        r.ctx.request_cancel(reason)
        if r.spec.is_async and r.future is not None and not r.future.done():
            r.future.cancel()

    async def _execute(self, r: _Running) -> None:
        ctx = r.ctx
        try:
            outcome, value = await self._invoke(r)
        finally:
            r.future = None  # from here on a cancel can no longer interrupt this task's own writes
            self._running.pop(ctx.id, None)
            self._running_by_type[ctx.task.type] -= 1
            self.fetcher.slot_freed(ctx.task.type)
        if ctx.cancel_reason == "shutdown" or ctx.cancel_reason == "lost":
            return  # released by the shutdown, or no longer ours: nothing to write
        duration = time.monotonic() - r.started
        metrics.finished(ctx.task.type, outcome, duration)
        if outcome == "done":
            if ctx.completed_in_transaction:
                self.stats.done += 1
                return
            try:
                result = _json_result(value if value is not None else ctx.result)
            except (TypeError, ValueError) as exc:
                await self._db(self._fail, ctx, Fail(f"result is not JSON-serialisable: {exc}"), True)
                return
            _, lines = _take_pending(ctx)
            self._done.append(_Done(ctx.id, ctx.attempt, result, "\n".join(filter(None, [lines, ctx.line(
                f"Done in {duration:.2f}s.")]))))
            self._done_event.set()
        elif outcome == "cancelled":
            await self._db(self._mark_cancelled, ctx)
        elif outcome == "snooze":
            await self._db(self._snooze, ctx, value)
        else:
            await self._db(self._fail, ctx, value, outcome == "fail")

    async def _invoke(self, r: _Running) -> tuple[str, Any]:
        """Run the handler with its timeouts; returns (outcome, value or exception)."""
        ctx, spec = r.ctx, r.spec
        payload: Any = ctx.payload
        if spec.payload is not None:
            try:
                payload = spec.payload.model_validate(payload)
            except ValidationError as exc:
                return "fail", Fail(f"malformed payload: {exc.errors()[0]['msg']} at "
                                    f"{'.'.join(map(str, exc.errors()[0]['loc']))}")
        if ctx.is_cancelled:
            return "cancelled", None
        loop = asyncio.get_running_loop()
        if spec.is_async and spec.timeout is None and spec.hard_timeout is None:
            # The common case runs the handler inside this task: no second task per run.
            r.future = asyncio.current_task()
            fut: asyncio.Future[Any] | None = None
        elif spec.is_async:
            fut = asyncio.ensure_future(spec.handler(ctx, payload))
        elif spec.isolation == "process" or self.isolation == "process":
            from jobqueue.runtime.isolation import run_in_process

            fut = asyncio.ensure_future(run_in_process(spec, ctx, payload))
        else:
            fut = asyncio.ensure_future(loop.run_in_executor(self._executor, spec.handler, ctx, payload))
        try:
            if fut is None:
                value = await spec.handler(ctx, payload)
            else:
                r.future = fut
                value = await self._await_with_timeouts(r, fut)
        except Snooze as exc:
            return "snooze", exc
        except Fail as exc:
            return "fail", exc
        except (Cancelled, asyncio.CancelledError) as exc:
            if fut is None and isinstance(exc, asyncio.CancelledError) and (task := asyncio.current_task()):
                task.uncancel()  # the cancel was aimed at the handler; this task goes on to record it
            if ctx.cancel_reason == "timeout":
                return "retry", TimeoutError(f"soft timeout of {spec.timeout}s exceeded")
            if ctx.cancel_reason in ("user", "shutdown", "lost"):
                return "cancelled", None
            return "retry", exc if isinstance(exc, Exception) else RuntimeError("handler was cancelled")
        except LeaseLost:
            ctx.request_cancel("lost")
            return "cancelled", None
        except Exception as exc:
            return "retry", exc
        if ctx.is_cancelled and ctx.cancel_reason in ("lost", "shutdown"):
            return "cancelled", None
        return "done", value

    async def _await_with_timeouts(self, r: _Running, fut: asyncio.Future[Any]) -> Any:
        spec = r.spec
        soft, hard = spec.timeout, spec.hard_timeout
        if soft is None and hard is None:
            return await fut
        first = soft if soft is not None else hard
        assert first is not None
        done, _ = await asyncio.wait({fut}, timeout=first)
        if done:
            return fut.result()
        if soft is not None:
            r.ctx.request_cancel("timeout")
            if spec.is_async:
                fut.cancel()
            remaining = (hard - soft) if hard is not None else None
            done, _ = await asyncio.wait({fut}, timeout=remaining)
            if done:
                return fut.result()
        # Hard timeout: abandon the attempt. A thread cannot be killed; its late result is dropped.
        r.abandoned = True
        fut.cancel()
        raise TimeoutError(f"hard timeout of {hard}s exceeded; attempt abandoned")

    # ------------------------------------------------------------------ writes

    @contextlib.asynccontextmanager
    async def _handler_connection(self) -> AsyncIterator[Any]:
        """A connection of the handlers' pool, created on first use (most task types never ask)."""
        if self._handler_pool is None:
            async with self._handler_pool_lock:
                if self._handler_pool is None:
                    self._handler_pool = await self._create_pool(for_handlers=True)
        async with self._handler_pool.acquire() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _complete_tx(self, ctx: Context) -> AsyncIterator[Any]:
        async with self._handler_connection() as conn, conn.transaction():
            yield conn
            if ctx.is_cancelled and ctx.cancel_reason in ("user", "lost", "shutdown"):
                raise asyncio.CancelledError()
            _, lines = _take_pending(ctx)
            rows = await conn.fetch(
                self.q.complete_many, [ctx.id], [ctx.attempt], [_json_result(ctx.result)],
                ["\n".join(filter(None, [lines, ctx.line("Done.")]))], self.log_chars, self.id)
            if not rows:
                raise LeaseLost(f"task {ctx.id} attempt {ctx.attempt} is no longer ours")
            if rows[0]["has_dependents"]:
                await conn.fetch(self.q.release_dependents, [ctx.id])
        ctx.completed_in_transaction = True

    async def _completer(self) -> None:
        while True:
            await self._done_event.wait()
            self._done_event.clear()
            await self._flush_done()

    async def _flush_done(self) -> None:
        """Write every finished task; returns only when nothing is pending or in flight (the lock
        makes a caller wait for a flush another coroutine started)."""
        async with self._flush_lock:
            while self._done:
                batch, self._done = self._done[:2000], self._done[2000:]
                await self._db(self._complete_batch, batch)

    async def _complete_batch(self, conn: asyncpg.Connection, batch: list[_Done]) -> None:
        async with conn.transaction():
            rows = await conn.fetch(
                self.q.complete_many, [d.id for d in batch], [d.attempt for d in batch],
                [d.result for d in batch], [d.line for d in batch], self.log_chars, self.id)
            parents = [r["id"] for r in rows if r["has_dependents"]]
            if parents:
                await conn.fetch(self.q.release_dependents, parents)
        self.stats.done += len(rows)
        if len(rows) < len(batch):
            log.warning("%d completion(s) rejected: lease lost to the rescuer", len(batch) - len(rows))

    async def _fail(self, conn: asyncpg.Connection, ctx: Context, exc: BaseException, final: bool) -> None:
        spec = self.specs[ctx.task.type]
        base = spec.backoff_base if spec.backoff_base is not None else self.settings.backoff_base
        cap = spec.backoff_max if spec.backoff_max is not None else self.settings.backoff_max
        summary = f"{type(exc).__name__}: {exc}"
        _, lines = _take_pending(ctx)
        line = "\n".join(filter(None, [lines, ctx.line(f"[ERROR] {redact_text(summary)[:500]}")]))
        error = redact_text(summary if isinstance(exc, Fail) else _short_traceback(exc))
        async with conn.transaction():
            row = await conn.fetchrow(self.q.fail, ctx.id, ctx.attempt, final, base, cap, error, line,
                                      self.log_chars, self.id)
            if row is None:
                return
            if row["status"] == "failed":
                self.stats.failed += 1
                if row["has_dependents"]:
                    await conn.fetch(self.q.cancel_dependents, [ctx.id],
                                     ctx.line(f"[Canceled] parent task {ctx.id} failed"), self.log_chars)
            else:
                self.stats.retried += 1
                self.fetcher.wake_at(row["run_at"].timestamp())

    async def _mark_cancelled(self, conn: asyncpg.Connection, ctx: Context) -> None:
        _, lines = _take_pending(ctx)
        line = "\n".join(filter(None, [lines, ctx.line("[Canceled] Task has been canceled.")]))
        async with conn.transaction():
            row = await conn.fetchrow(self.q.mark_cancelled, ctx.id, ctx.attempt, line, self.log_chars)
            if row is not None:
                self.stats.cancelled += 1
                if row["has_dependents"]:
                    await conn.fetch(self.q.cancel_dependents, [ctx.id],
                                     ctx.line(f"[Canceled] parent task {ctx.id} was cancelled"), self.log_chars)

    async def _snooze(self, conn: asyncpg.Connection, ctx: Context, exc: Snooze) -> None:
        _, lines = _take_pending(ctx)
        line = "\n".join(filter(None, [lines, ctx.line(f"[SNOOZE] {exc}")]))
        await conn.fetch(self.q.snooze, ctx.id, ctx.attempt, float(exc.seconds), line, self.log_chars)
        self.fetcher.schedule_wake(max(0.0, exc.seconds))

    async def _release(self, conn: asyncpg.Connection, ctxs: list[Context]) -> None:
        await conn.fetch(self.q.release, [c.id for c in ctxs], self.id,
                         ctxs[0].line("[INFO] released by worker shutdown"), self.log_chars)

    async def _progress_writer(self) -> None:
        while True:
            await asyncio.sleep(self.settings.progress_interval)
            if self._dirty:
                await self._flush_progress()

    async def _flush_progress(self) -> None:
        ids, self._dirty = self._dirty, set()
        batch = [(r.ctx, *_take_pending(r.ctx)) for i in ids if (r := self._running.get(i)) is not None]
        if not batch:
            return

        async def write(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(
                self.q.progress_many, [c.id for c, _, _ in batch], [c.attempt for c, _, _ in batch],
                [p for _, p, _ in batch], [lines for _, _, lines in batch], self.log_chars)
            return rows

        rows = await self._db(write)
        metrics.PROGRESS_WRITES.inc()
        self._apply_flags(rows, [c.id for c, _, _ in batch])

    def _apply_flags(self, rows: list[asyncpg.Record], asked: list[int]) -> None:
        """Cancel handlers whose task was cancelled, or was rescued from us (the zombie case)."""
        ours = {r["id"] for r in rows}
        for r in rows:
            if r["cancel_requested"] and (run := self._running.get(r["id"])) is not None:
                self._cancel(run, "user")
        for task_id in asked:
            run = self._running.get(task_id)
            if task_id not in ours and run is not None and not run.ctx.completed_in_transaction:
                log.warning("task %d is no longer ours (lease lost); cancelling its handler", task_id)
                self._cancel(run, "lost")


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
