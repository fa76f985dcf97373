"""The dispatcher: the runtime's record of the attempts this worker runs, from claim to end.

It starts each claimed row as an :class:`~jobqueue.runtime.executor.Attempt` (decoding its payload on
its own, so a payload Python cannot decode fails alone), hands the executor's ack to the completer,
and frees the slot. Attempts are tracked by (id, attempt): a re-claim of an id whose older attempt
still runs here waits until that attempt has ended, so one worker never runs two attempts of a task
at once; ``running_pairs()`` is what the heartbeat renews. A hard-timed-out sync handler's thread
cannot be killed: it leaves the running map but keeps its slot until it returns. On shutdown,
``drain()`` gives the attempts the grace period, then stops what can be stopped (async handlers,
process-isolated children) and releases it; a sync handler in a thread stays owned until it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import asyncpg

from jobqueue import registry, tracing
from jobqueue.errors import Fail, LeaseLost
from jobqueue.observe import metrics
from jobqueue.runtime.completer import Completer
from jobqueue.runtime.context import ClaimedTask, Context, clock
from jobqueue.runtime.executor import Ack, Attempt, Executor
from jobqueue.runtime.prefetch import Ahead
from jobqueue.runtime.progress import ProgressWriter
from jobqueue.states import CancelReason, Outcome

if TYPE_CHECKING:
    from jobqueue.runtime.worker import WorkerStats

log = logging.getLogger("jobq.worker")
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    """json.loads for the text PostgreSQL makes of a jsonb (no whitespace around it), without
    json.loads' two whitespace matches per call; anything unusual goes to json.loads itself, whose
    errors are the ones reported."""
    try:
        value, end = _scan(text, 0)
    except (StopIteration, ValueError):
        return json.loads(text)
    return value if end == len(text) else json.loads(text)



class Dispatcher:
    def __init__(
        self,
        specs: dict[str, registry.TaskType],
        *,
        executor: Executor,
        completer: Completer,
        progress: ProgressWriter,
        stats: WorkerStats,
        connection: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
        freed: Callable[[str], None],
        stopping: Callable[[], bool],
        concurrency: int,
        limits: dict[str, int],
        prefetch: int,
    ) -> None:
        self.specs = specs
        self.executor = executor
        self.completer = completer
        self.progress = progress
        self.stats = stats
        self._connection = connection
        self._freed = freed  # a slot of this type is free: the fetcher may claim
        self._stopping = stopping
        # The attempts running, by task id (at most one per id); their count per type, which also
        # counts deferred re-claims and abandoned threads (both hold a slot); re-claims waiting for
        # their older attempt; hard-timed-out threads that have not returned.
        self.running: dict[int, Attempt] = {}
        self.by_type = dict.fromkeys(specs, 0)
        self.deferred: dict[int, asyncpg.Record] = {}
        self.abandoned: set[Attempt] = set()
        # Tasks claimed ahead of a free slot (prefetch.py), started by _pump as slots free.
        self.concurrency = concurrency
        self.limits = limits
        self.ahead = Ahead(prefetch)
        self._pumping = False
        # The types whose handler the dispatcher runs itself until it first waits (Executor.inline).
        # While a claim's rows are started: the types whose slots were freed meanwhile, and the acks
        # of the handlers that ended (dispatch_many).
        self._freed_meanwhile: set[str] | None = None
        self._acks_meanwhile: list[Ack] | None = None
        self._context = Context.bound(log=log, transaction=self._transaction, on_progress=progress.mark,
                                      connection=connection, sql=completer.q)
        self._inline = {t: executor.inline(spec) for t, spec in specs.items()}
        # The asyncio tasks of the attempts (the event loop keeps only weak references).
        self._handles: set[asyncio.Task[Any]] = set()
        progress.running = self.running

    def running_pairs(self) -> list[tuple[int, int]]:
        """The (id, attempt) pairs this worker owns, the ones the heartbeat renews: attempts running,
        re-claims waiting for their older attempt, tasks claimed ahead, and acks not written yet."""
        pairs = [a.key for a in self.running.values()]
        pairs += [(row["id"], row["attempt"]) for row in self.deferred.values()]
        pairs += self.ahead.waiting.items()
        pairs += [(ack.id, ack.attempt) for ack in self.completer.pending + self.completer.in_flight]
        return pairs

    def dispatch_many(self, rows: list[asyncpg.Record]) -> None:
        """Start a claim's rows, in the claim's order; the rows claimed ahead of a free slot wait for
        one. The fetcher calls this and claims again right after, so the slots that handlers ending
        inline free meanwhile need not wake it one by one (it hears once per type, at the end), and
        their acks reach the completer together."""
        self.stats.claimed += len(rows)
        metrics.started_many(rows)  # in flight from the claim on: running, or claimed ahead
        self._freed_meanwhile = freed = set[str]()
        self._acks_meanwhile = acks = list[Ack]()
        try:
            if not self.ahead.prefetch:
                for row in rows:
                    self._dispatch_one(row)
            else:
                for row in rows:
                    if self._startable(row["type"]):
                        self._dispatch_one(row)
                    else:
                        self.ahead.put(row)
        finally:
            self._freed_meanwhile = self._acks_meanwhile = None
            self.completer.add_many(acks)
            for task_type in freed:
                self._freed(task_type)

    def _dispatch_one(self, row: asyncpg.Record) -> None:
        try:
            self.dispatch(row)
        except Exception as exc:  # a bug of the runtime must cost this row, not the claim's others
            self._not_started(row, exc)

    def _slot_free(self) -> bool:
        """Abandoned threads (hard timeouts) hold their slot until they return."""
        return len(self.running) + len(self.abandoned) < self.concurrency

    def _type_free(self, task_type: str) -> bool:
        return self.by_type[task_type] < self.limits[task_type]

    def _startable(self, task_type: str) -> bool:
        """A slot of this type is free now and no task of it claimed earlier waits for one."""
        return self._slot_free() and self._type_free(task_type) and not self.ahead.has(task_type)

    def _pump(self) -> None:
        """Start the tasks claimed ahead while their types have free slots, earliest claim first. A
        handler that ends inline frees its slot inside the start, which comes back here: the loop below
        goes on instead, so a run of short handlers costs no recursion."""
        if self._pumping or not self.ahead.waiting or self._stopping():
            return
        self._pumping = True
        try:
            while self._slot_free():
                row = self.ahead.pop(self._type_free)
                if row is None:
                    return
                self._dispatch_one(row)
        finally:
            self._pumping = False

    def owns(self, task_id: int) -> int | None:
        """The attempt of `task_id` running here or claimed ahead (None: neither)."""
        a = self.running.get(task_id)
        return a.attempt if a is not None else self.ahead.waiting.get(task_id)

    def cancel_ahead(self, task_id: int, attempt: int) -> None:
        """A confirmed cancel of a task claimed ahead: it ends cancelled without running its handler.
        (A re-claim waiting behind its older attempt here stays: it starts as a deferred one, and the
        beat's cancel flag stops it then.)"""
        if task_id in self.running:
            return
        if self.ahead.waiting.get(task_id) == attempt and (row := self.ahead.take(task_id)) is not None:
            self.by_type[row["type"]] += 1
            self._start(row, row["id"], row["type"], cancelled=True)

    def drop_ahead(self, task_id: int, attempt: int) -> None:
        """A task claimed ahead that the heartbeat found no longer ours: nothing of it is written."""
        if self.ahead.waiting.get(task_id) == attempt and (row := self.ahead.take(task_id)) is not None:
            metrics.unstarted(row["type"])

    def release_ahead(self, waited: float = 0.0) -> int:
        """Give the tasks claimed ahead back to the queue (all, or those that waited `waited` seconds)."""
        rows = self.ahead.take_all(waited)
        why = "by worker shutdown" if not waited else f"unstarted: waited over {waited:g}s for a free slot"
        for row in rows:
            metrics.unstarted(row["type"])
            self._release(row, why)
        return len(rows)

    def _not_started(self, row: asyncpg.Record, exc: Exception) -> None:
        """Starting a claimed row raised. Left alone, its attempt would stay `running` here for ever
        (a burst worker waits for it) and its slot be lost: an attempt already registered ends as its
        error says (retried within its budget); one that was not is dropped here, its slot freed, and
        its lease, no longer renewed, lets the rescuer requeue it."""
        log.exception("task %d: the runtime could not start it", row["id"])
        a = self.running.get(row["id"])
        if a is not None:
            self._end(a, *self.executor.outcome_of(a, exc))
        else:
            self.by_type[row["type"]] -= 1

    def dispatch(self, row: asyncpg.Record) -> None:
        """Start a claimed row. Its payload is decoded here, row by row: one that Python cannot decode
        fails alone. An id whose older attempt still runs here (its lease expired and we re-claimed it)
        waits until that attempt has ended: never two attempts of one task in one worker."""
        task_id, task_type = row["id"], row["type"]
        self.by_type[task_type] += 1
        old = self.running.get(task_id)
        if old is not None:
            self.deferred[task_id] = row
            self.executor.cancel(old, CancelReason.LOST)  # its writes would be rejected anyway
            return
        self._start(row, task_id, task_type)

    def _start(self, row: asyncpg.Record, task_id: int, task_type: str, *, cancelled: bool = False) -> None:
        spec = self.specs[task_type]
        try:
            payload, bad = _loads(row["payload"]), None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit integer, 2,000 nested arrays
            payload, bad = None, Fail(f"payload cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}")
        ctx = self._context(ClaimedTask(row, payload))
        a = Attempt(ctx, spec, task_id, row["attempt"], task_type)
        if bad is not None:
            self.by_type[task_type] -= 1
            metrics.finished(task_type, Outcome.FAILED, 0.0)
            self._add(self.executor.ack(a, Outcome.FAILED, bad))
            return
        self.running[task_id] = a
        if cancelled or row["cancel_requested"]:
            ctx.request_cancel(CancelReason.USER)
        if not self._inline[task_type] or tracing.enabled():
            self._start_executing(a)
            return
        # Run an async handler without timeouts right here, in the caller's step of the loop, until it
        # first waits: a handler that never waits (a no-op, a cache hit) ends without an asyncio task
        # or a coroutine of the runtime's own, which were most of the worker's CPU per task. One that
        # waits goes on in a task from where it stopped (`_finish_later`). It runs in a copy of the
        # context, as a task would.
        if spec.payload is not None or ctx.is_cancelled:
            ended, payload = self.executor.begin(a)
            if ended is not None:
                self._end(a, ended, payload)
                return
        context = contextvars.copy_context()
        try:
            # Inside the try: a handler whose signature does not fit raises here, at the call, and that
            # must fail its attempt like any error of the handler, not escape into the claim's dispatch.
            coro = spec.handler(ctx, payload)
            waiting_on = context.run(coro.send, None)
        except StopIteration as stop:
            value = stop.value
            if value is None and ctx.result is None and not ctx._dirty and ctx.cancel_reason is None:
                # The hot path: a success with nothing to store that reported nothing.
                seconds = time.monotonic() - a.started
                self.ahead.ended(task_type, seconds)
                self._forget(a)
                metrics.finished(task_type, Outcome.DONE, seconds)
                self._add(self.executor.done_ack(a, seconds))
                return
            self._end(a, Outcome.DONE, value)
            return
        except BaseException as exc:
            self._end(a, *self.executor.outcome_of(a, exc))
            return
        self._spawn(self._finish_later(a, coro, waiting_on), a, context, handler_task=True)

    def _start_executing(self, a: Attempt) -> None:
        """Any other handler (sync, with timeouts, traced) runs in _execute, itself started right here,
        in the caller's step of the loop, until it first waits (a handler that never does ends without
        an asyncio task); then it goes on in a task from where it stopped."""
        coro = self._execute(a)
        context = contextvars.copy_context()
        try:
            waiting_on = context.run(coro.send, None)
        except StopIteration:
            return
        self._spawn(_resume(coro, waiting_on), a, context,
                    handler_task=a.future is not None and a.future is asyncio.current_task())

    def _add(self, ack: Ack) -> None:
        """Hand an ack to the completer (at the end of the claim's dispatch, when one runs)."""
        if self._acks_meanwhile is not None:
            self._acks_meanwhile.append(ack)
        else:
            self.completer.add(ack)

    def _spawn(self, coro: Coroutine[Any, Any, None], a: Attempt, context: contextvars.Context, *,
               handler_task: bool) -> None:
        """Go on with an attempt that waits in an asyncio task; with `handler_task`, the task is what
        a cancel of the attempt interrupts."""
        handle = asyncio.get_running_loop().create_task(coro, name=f"jobq-task-{a.id}", context=context)
        if handler_task:
            a.future = handle
        # The running map holds the attempt's record; the set keeps the asyncio task itself alive.
        self._handles.add(handle)
        handle.add_done_callback(self._handles.discard)

    async def _finish_later(self, a: Attempt, coro: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        """The rest of an inline handler that waited (`_start`), in its own task."""
        try:
            value = await _continue(coro, waiting_on)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and (task := asyncio.current_task()):
                task.uncancel()  # the cancel was aimed at the handler; this task goes on to record it
            self._end(a, *self.executor.outcome_of(a, exc))
            return
        self._end(a, Outcome.DONE, value)

    def _end(self, a: Attempt, outcome: Outcome, value: Any) -> None:
        """An inline handler has ended: its ack, then the same bookkeeping as `_execute`."""
        try:
            ack = self.executor.finish(a, outcome, value)
        except Exception as exc:  # a bug of the runtime must cost this attempt, not the worker
            log.exception("task %d: the executor failed", a.id)
            ack = self.executor.ack(a, Outcome.RETRY, exc)
        self._forget(a)
        self._record(a, ack)

    def _record(self, a: Attempt, ack: Ack | None) -> None:
        seconds = time.monotonic() - a.started
        self.ahead.ended(a.type, seconds)
        if ack is not None:
            if ack.outcome is not Outcome.RELEASED:
                metrics.finished(a.type, ack.outcome, seconds)
            self._add(ack)
        elif a.completed_in_transaction:
            metrics.finished(a.type, Outcome.DONE, seconds)

    def _transaction(self, ctx: Context) -> contextlib.AbstractAsyncContextManager[Any]:
        a = self.running.get(ctx.id)
        if a is None or a.ctx is not ctx:
            raise LeaseLost(f"task {ctx.id} attempt {ctx.attempt} is no longer running here")
        return self.completer.transaction(a)

    async def _execute(self, a: Attempt) -> None:
        ack: Ack | None
        try:
            ack = await self.executor.run(a)
        except Exception as exc:  # a bug of the runtime must cost this attempt, not the worker
            log.exception("task %d: the executor failed", a.id)
            ack = self.executor.ack(a, Outcome.RETRY, exc)
        finally:
            thread = a.thread
            lingering = thread is not None and not thread.done()
            self._forget(a, keep_slot=lingering)
            if thread is not None and lingering:
                self.abandoned.add(a)
                loop = asyncio.get_running_loop()

                def returned(_: object) -> None:
                    with contextlib.suppress(RuntimeError):  # the loop is gone: the worker has stopped
                        loop.call_soon_threadsafe(self._thread_returned, a)

                thread.add_done_callback(returned)
        self._record(a, ack)

    def _forget(self, a: Attempt, *, keep_slot: bool = False) -> None:
        """The attempt has ended: free its slot (unless its thread lingers), and start the newer
        attempt of the same task if one was claimed meanwhile."""
        task_id = a.id
        if self.running.get(task_id) is a:
            del self.running[task_id]
            if not keep_slot:
                self.by_type[a.type] -= 1
            row = self.deferred.pop(task_id, None)
            if row is not None and self._stopping():
                self.by_type[row["type"]] -= 1
                self._release(row, "by worker shutdown")
            elif row is not None:
                self._start(row, task_id, row["type"])
        if self.ahead.waiting:
            self._pump()
        if self._freed_meanwhile is not None:
            self._freed_meanwhile.add(a.type)
        else:
            self._freed(a.type)

    def _thread_returned(self, a: Attempt) -> None:
        """An abandoned sync handler's thread has returned at last: its slot is free."""
        self.abandoned.discard(a)
        self.by_type[a.type] -= 1
        self._pump()
        self._freed(a.type)

    def _release(self, row: asyncpg.Record, why: str) -> None:
        """Back to the queue, never started here (a deferred re-claim, a task claimed ahead)."""
        self.completer.add(Ack(Outcome.RELEASED, row["id"], row["attempt"], row["type"],
                               f"{clock()} [INFO] released {why}"))

    def apply_flags(self, rows: list[asyncpg.Record], asked: list[tuple[int, int]]) -> None:
        """Cancel handlers whose task was cancelled, or that are no longer ours (the zombie case):
        `rows` are the tasks the heartbeat or the progress flush found ours, out of `asked`."""
        ours = {r["id"] for r in rows}
        for r in rows:
            if r["cancel_requested"] and (a := self.running.get(r["id"])) is not None:
                self.executor.cancel(a, CancelReason.USER)
        for task_id, attempt in asked:
            a = self.running.get(task_id)
            if (task_id not in ours and a is not None and a.attempt == attempt
                    and not a.completed_in_transaction):
                log.warning("task %d is no longer ours (lease lost); cancelling its handler", task_id)
                self.executor.cancel(a, CancelReason.LOST)

    async def drain(self, grace: float) -> None:
        """Shutdown: the running attempts get the grace period; then they are asked to stop and
        released. A sync handler in a thread cannot be stopped: its task stays ours (the heartbeat
        goes on renewing it) until the handler returns, or the process exits (a second signal)."""
        self.release_ahead()
        deadline = time.monotonic() + grace
        while self.owned() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.owned()
        if not left:
            return
        for a in left:
            self.executor.cancel(a, CancelReason.SHUTDOWN)
        warned = False
        while left := self.owned():
            if not warned and all(a.in_thread for a in left):
                log.warning("%d sync handler(s) still running after the grace period; their tasks stay "
                            "owned until they return (send the signal again to exit now)", len(left))
                warned = True
            await asyncio.sleep(0.05)

    def owned(self) -> list[Attempt]:
        return list(self.running.values())


@types.coroutine
def _continue(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, None, Any]:
    """Drive a coroutine that was started outside any task, as ``await`` would from here on: what it
    waits for is handed to the running task unchanged, and the task's results, exceptions and
    cancellations are passed back into it; returns what the coroutine returned."""
    while True:
        thrown: BaseException | None = None
        try:
            yield waiting_on
        except BaseException as exc:  # a cancel of the task (or anything thrown into it) reaches the handler
            thrown = exc
        try:
            waiting_on = coro.send(None) if thrown is None else coro.throw(thrown)
        except StopIteration as stop:
            return stop.value


async def _resume(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    await _continue(coro, waiting_on)
