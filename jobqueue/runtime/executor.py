"""The executor: runs one handler and returns how its attempt ended, as an :class:`Ack` value.

It validates the payload, applies the soft and hard timeouts, runs sync handlers in a thread (or, with
process isolation, in a killable child) and async handlers on the loop, and turns whatever happened
into an ``Ack`` (oban-py's ack action). It writes no SQL: the completer writes acks in batches.

Values PostgreSQL would refuse are dealt with here, before they can reach a batch: NUL characters are
replaced in log lines and error texts, a result containing one (jsonb cannot store it) or that is not
JSON fails the attempt with that reason, a snooze beyond 100 years (or NaN) fails the attempt, and
progress values are clamped to the column's range.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import math
import re
import time
import traceback
from typing import Any, NamedTuple

from pydantic import ValidationError

from jobqueue import tracing
from jobqueue.db.connect import redact_text
from jobqueue.errors import Cancelled, Fail, LeaseLost, Snooze
from jobqueue.registry import TaskType
from jobqueue.runtime.context import Context, clock
from jobqueue.settings import Settings
from jobqueue.states import CancelReason, Outcome

# The longest snooze a task may ask for; beyond it PostgreSQL's timestamp arithmetic overflows.
MAX_SNOOZE_SECONDS = 100 * 365 * 86400.0
# json.dumps writes a NUL character as \u0000; an escaped backslash before "u0000" is no NUL.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class Ack(NamedTuple):
    """How one attempt ended: everything the completer needs to write it, and nothing else. A named
    tuple, immutable and the cheapest record to build (one per task on the hot path)."""

    outcome: Outcome
    id: int
    attempt: int
    type: str
    line: str = ""
    result: str | None = None  # JSON text (done)
    error: str | None = None  # last_error (retry, failed)
    seconds: float = 0.0  # the snooze, or the backoff base of a retry
    cap: float = 0.0  # the backoff cap of a retry


class Attempt:
    """The runtime's record of one running attempt; the handler only sees ``ctx``. A plain class with
    slots: one is made per task, and the id, attempt and type the runtime reads all the time are
    copied out of the row once."""

    __slots__ = (
        "abandoned",
        "attempt",
        "completed_in_transaction",
        "ctx",
        "future",
        "id",
        "spec",
        "started",
        "thread",
        "type",
    )

    def __init__(self, ctx: Context, spec: TaskType, task_id: int, attempt: int, task_type: str) -> None:
        self.ctx = ctx
        self.spec = spec
        self.id = task_id
        self.attempt = attempt
        self.type = task_type
        self.started = time.monotonic()
        # What a cancel interrupts: the handler's asyncio task or future (None once it cannot be interrupted).
        self.future: asyncio.Future[Any] | None = None
        # A sync handler's thread: it may outlive the attempt (hard timeout) and holds its pool slot until
        # it returns, so the attempt stays counted against capacity until then.
        self.thread: concurrent.futures.Future[Any] | None = None
        self.abandoned = False  # hard-timed-out: the task is no longer ours, only the thread lingers
        self.completed_in_transaction = False  # ctx.transaction() wrote the outcome already

    @property
    def key(self) -> tuple[int, int]:
        return self.id, self.attempt

    @property
    def in_thread(self) -> bool:
        """A sync handler in a thread that has not returned: it can be asked to stop, never forced."""
        return self.thread is not None and not self.thread.done()


def clean_text(text: str) -> str:
    """PostgreSQL text cannot hold NUL: a message with one must not cost the write it belongs to."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def json_result(value: Any) -> str | None:
    """The result as JSON text; raises ValueError for what jsonb would refuse."""
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise ValueError("it contains a NUL character (\\u0000), which PostgreSQL's jsonb cannot store")
    return text


def take_pending(ctx: Context) -> tuple[float | None, str]:
    """The task's pending progress and message lines, with any password in a postgres URL removed
    (a handler's messages end up in progress_msg, which every dashboard shows) and NULs replaced."""
    value, lines = ctx.take_pending()
    if value is not None:  # the column is a real in [-1, 1]: 1e300 would overflow the whole flush
        value = max(-1.0, min(1.0, value)) if math.isfinite(value) else None
    return value, clean_text(redact_text(lines)) if lines else lines


def short_traceback(exc: BaseException, frames: int = 6) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-frames)
    return "".join(tb)[-4000:]


class Executor:
    """Runs handlers; one per worker (it owns the thread pool of the sync handlers)."""

    def __init__(self, settings: Settings, *, concurrency: int, isolation: str | None) -> None:
        self.settings = settings
        self.isolation = isolation  # "process" runs every sync handler in a child, whatever its @task says
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="jobq-handler")

    def cancel(self, a: Attempt, reason: CancelReason) -> None:
        """Ask the attempt's handler to stop: an async one is interrupted, a process-isolated one
        killed (isolation.py watches the flag); a sync one stops at its next ``progress()``."""
        a.ctx.request_cancel(reason)
        if a.spec.is_async and a.future is not None and not a.future.done():
            a.future.cancel()

    @staticmethod
    def inline(spec: TaskType) -> bool:
        """Whether the dispatcher may run this type's handler itself, without an asyncio task until it
        first waits (while tracing is off: the attempt's span wraps the whole run): an async handler
        without timeouts (a timeout needs a task to cancel)."""
        return spec.is_async and spec.timeout is None and spec.hard_timeout is None

    async def run(self, a: Attempt) -> Ack | None:
        """Run the handler; the Ack to write, or None when there is nothing to write (the attempt is
        no longer ours, or ``ctx.transaction()`` completed it). With tracing on, under the attempt's span."""
        span = a.ctx.trace = tracing.attempt_span(a.ctx)
        if span is None:
            return self.finish(a, *await self._invoke(a))
        with span:
            span.ack = self.finish(a, *await self._invoke(a))
            span.reason = a.ctx.cancel_reason
        a.ctx.trace = None  # a hard-timed-out thread's late progress() is no event of the ended span
        return span.ack

    def finish(self, a: Attempt, outcome: Outcome, value: Any) -> Ack | None:
        """The Ack of a handler that ended with (outcome, value), or None when there is nothing to write."""
        a.future = None  # from here on a cancel can no longer interrupt this attempt's own writes
        ctx = a.ctx
        reason = ctx.cancel_reason
        if reason is CancelReason.LOST or a.completed_in_transaction:
            return None
        if outcome is Outcome.DONE:
            try:
                result = json_result(value if value is not None else ctx.result)
            except (TypeError, ValueError, RecursionError) as exc:
                return self.ack(a, Outcome.FAILED, Fail(f"result cannot be stored: {exc}"))
            return self.ack(a, Outcome.DONE, result=result)
        if reason is CancelReason.SHUTDOWN and outcome is Outcome.CANCELLED:
            outcome = Outcome.RELEASED
        return self.ack(a, outcome, value)

    @staticmethod
    def done_ack(a: Attempt, seconds: float, result: str | None = None) -> Ack:
        """The hot path: the Ack of a success that reported nothing since the last flush and ran
        `seconds`: one line, no joins."""
        return Ack(Outcome.DONE, a.id, a.attempt, a.type, f"{clock()} {a.ctx.prefix()}Done in {seconds:.2f}s.", result)

    def ack(self, a: Attempt, outcome: Outcome, value: Any = None, *, result: str | None = None) -> Ack:
        """The Ack of an attempt that ended with `outcome` (`value`: the exception or the Snooze)."""
        ctx, spec = a.ctx, a.spec
        if outcome is Outcome.DONE and not ctx._dirty:
            return self.done_ack(a, time.monotonic() - a.started, result)
        _, lines = take_pending(ctx)
        secs = cap = 0.0
        error: str | None = None
        if outcome is Outcome.SNOOZED:
            assert isinstance(value, Snooze)
            secs = max(0.0, float(value.seconds))
            if not secs <= MAX_SNOOZE_SECONDS:  # also NaN
                outcome, value = Outcome.FAILED, Fail(f"Snooze({value.seconds!r}) is out of range: "
                                                      f"seconds must be between 0 and {MAX_SNOOZE_SECONDS:.0f}")
        if outcome is Outcome.DONE:
            last = f"Done in {time.monotonic() - a.started:.2f}s."
        elif outcome in (Outcome.RETRY, Outcome.FAILED):
            exc = value if isinstance(value, BaseException) else RuntimeError(str(value))
            secs = spec.backoff_base if spec.backoff_base is not None else self.settings.backoff_base
            cap = spec.backoff_max if spec.backoff_max is not None else self.settings.backoff_max
            if outcome is Outcome.RETRY and (spec.retry_on is not None or spec.backoff is not None):
                outcome, exc, secs, cap = self._policy(a, exc, secs, cap)
            summary = clean_text(redact_text(f"{type(exc).__name__}: {exc}"))
            error = summary if isinstance(exc, Fail) else clean_text(redact_text(short_traceback(exc)))
            last = f"[ERROR] {summary[:500]}"
        elif outcome is Outcome.SNOOZED:
            last = clean_text(f"[SNOOZE] {value}")
        elif outcome is Outcome.RELEASED:
            last = "[INFO] released by worker shutdown"
        else:
            last = "[Canceled] Task has been canceled."
        line = "\n".join(filter(None, [lines, ctx.line(last)]))
        return Ack(outcome, a.id, a.attempt, a.type, line, result, error, secs, cap)

    def _policy(self, a: Attempt, exc: BaseException, secs: float, cap: float
                ) -> tuple[Outcome, BaseException, float, float]:
        """The type's retry policy for an error: (outcome, error, seconds, cap). An error outside
        ``retry_on`` fails the task at once; ``backoff(n)`` gives the exact delay of retry n (a negative
        cap tells finish_many not to apply the exponential backoff or its jitter)."""
        spec = a.spec
        if spec.retry_on is not None and not isinstance(exc, spec.retry_on):
            return Outcome.FAILED, exc, secs, cap
        if spec.backoff is None:
            return Outcome.RETRY, exc, secs, cap
        try:
            delay = float(spec.backoff(a.ctx.task.retry_count + 1))
        except Exception as bad:
            return Outcome.FAILED, Fail(f"backoff raised {type(bad).__name__}: {bad} (after {exc!r})"), secs, cap
        if not 0 <= delay <= MAX_SNOOZE_SECONDS:  # also NaN
            return Outcome.FAILED, Fail(f"backoff returned {delay!r}: seconds must be between 0 and "
                                        f"{MAX_SNOOZE_SECONDS:.0f} (after {exc!r})"), secs, cap
        return Outcome.RETRY, exc, delay, -1.0

    def begin(self, a: Attempt) -> tuple[Outcome | None, Any]:
        """Before the handler runs: the payload as the handler takes it (validated against the type's
        model) as ``(None, payload)``, or how the attempt ends without running (a malformed payload,
        a task cancelled before it started)."""
        ctx, spec = a.ctx, a.spec
        payload: Any = ctx.payload
        if spec.payload is not None:
            try:
                payload = spec.payload.model_validate(payload)
            except ValidationError as exc:
                return Outcome.FAILED, Fail(f"malformed payload: {exc.errors()[0]['msg']} at "
                                            f"{'.'.join(map(str, exc.errors()[0]['loc']))}")
        if ctx.is_cancelled:
            return Outcome.CANCELLED, None
        return None, payload

    def outcome_of(self, a: Attempt, exc: BaseException) -> tuple[Outcome, Any]:
        """How the attempt ends when its handler raised `exc`; anything but an Exception or a
        cancellation (KeyboardInterrupt, SystemExit) is raised again."""
        ctx = a.ctx
        if isinstance(exc, Snooze):
            return Outcome.SNOOZED, exc
        if isinstance(exc, Fail):
            return Outcome.FAILED, exc
        if isinstance(exc, (Cancelled, asyncio.CancelledError)):
            if ctx.cancel_reason == CancelReason.TIMEOUT:
                return Outcome.RETRY, TimeoutError(f"soft timeout of {a.spec.timeout}s exceeded")
            if ctx.cancel_reason is not None:
                return Outcome.CANCELLED, None
            return Outcome.RETRY, exc if isinstance(exc, Exception) else RuntimeError("handler was cancelled")
        if isinstance(exc, LeaseLost):
            ctx.request_cancel(CancelReason.LOST)
            return Outcome.CANCELLED, None
        if isinstance(exc, Exception):
            return Outcome.RETRY, exc
        raise exc

    async def _invoke(self, a: Attempt) -> tuple[Outcome, Any]:
        """Run the handler with its timeouts; returns (outcome, value or exception)."""
        ctx, spec = a.ctx, a.spec
        ended, payload = self.begin(a)
        if ended is not None:
            return ended, payload
        fut: asyncio.Future[Any] | None
        if spec.is_async and spec.timeout is None and spec.hard_timeout is None:
            # The common case runs the handler inside this task: no second task per run.
            a.future = asyncio.current_task()
            fut = None
        elif spec.is_async:
            fut = asyncio.ensure_future(spec.handler(ctx, payload))
        elif spec.isolation == "process" or self.isolation == "process":
            from jobqueue.runtime.isolation import run_in_process

            fut = asyncio.ensure_future(run_in_process(spec, ctx, payload))
        else:
            if ctx.trace is None:
                a.thread = self.pool.submit(spec.handler, ctx, payload)
            else:  # the handler's own spans (and what it enqueues) are children of the attempt's span
                a.thread = self.pool.submit(contextvars.copy_context().run, spec.handler, ctx, payload)
            fut = asyncio.wrap_future(a.thread, loop=asyncio.get_running_loop())
        try:
            if fut is None:
                value = await spec.handler(ctx, payload)
            else:
                a.future = fut
                value = await self._await_with_timeouts(a, fut)
        except BaseException as exc:
            if fut is None and isinstance(exc, asyncio.CancelledError) and (task := asyncio.current_task()):
                task.uncancel()  # the cancel was aimed at the handler; this task goes on to record it
            return self.outcome_of(a, exc)
        if ctx.cancel_reason == CancelReason.LOST:
            return Outcome.CANCELLED, None
        # A handler that returned normally did its work, even if a shutdown asked it to stop meanwhile.
        return Outcome.DONE, value

    async def _await_with_timeouts(self, a: Attempt, fut: asyncio.Future[Any]) -> Any:
        spec = a.spec
        soft, hard = spec.timeout, spec.hard_timeout
        if soft is None and hard is None:
            return await fut
        first = soft if soft is not None else hard
        assert first is not None
        done, _ = await asyncio.wait({fut}, timeout=first)
        if done:
            return fut.result()
        if soft is not None:
            a.ctx.request_cancel(CancelReason.TIMEOUT)
            if spec.is_async:
                fut.cancel()
            remaining = (hard - soft) if hard is not None else None
            done, _ = await asyncio.wait({fut}, timeout=remaining)
            if done:
                return fut.result()
        # Hard timeout: abandon the attempt. A thread cannot be killed: its late result is dropped, and
        # it keeps counting against capacity until it returns (Attempt.thread).
        a.abandoned = True
        fut.cancel()
        raise TimeoutError(f"hard timeout of {hard}s exceeded; attempt abandoned")

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
