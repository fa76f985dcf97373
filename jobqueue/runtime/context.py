"""What a handler sees: its task, progress reporting, cancellation, results, its transaction.

``progress()`` never blocks and never touches the database itself: it records the newest value and
the message lines, and the worker writes all running tasks' progress in one statement a few times a
second. So a handler may call it 10,000 times a second; the last value is always written (at the
latest with the task's completion). It is also where a plain (sync) handler learns that its task
was cancelled: the call raises :class:`~jobqueue.errors.Cancelled`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from jobqueue.errors import Cancelled
from jobqueue.states import CancelReason

if TYPE_CHECKING:
    import asyncpg

    from jobqueue.db.queries import RuntimeSQL
    from jobqueue.tracing import AttemptSpan

# How many pending message lines a task keeps between two flushes (the log is bounded anyway).
MAX_PENDING_LINES = 64
# Makes each context's own lock, once (Context._guard).
_FIRST_LOCK = threading.Lock()


# The claimed row's columns a handler can read as ``ctx.task.<name>``, in the claim's order.
TASK_FIELDS = ("id", "type", "priority", "payload", "attempt", "retry_count", "max_retries", "created_at", "run_at",
               "doc_id", "batch_id", "from_page", "to_page", "owner", "labels", "digest", "trace_context")


class ClaimedTask:
    """The claimed row, as the claim statement returned it (read-only).

    It keeps the row itself (an asyncpg Record, or any mapping of the same names) and reads a column
    when asked: a worker claims thousands of rows a second and most handlers read two or three of
    their 17 columns, so copying each into an attribute was a good part of the CPU per task."""

    __slots__ = ("_payload", "_row")

    def __init__(self, row: Any, payload: Any) -> None:
        self._row = row
        self._payload = payload

    @property
    def payload(self) -> Any:
        """The payload as decoded JSON (the handler's second argument before model validation)."""
        return self._payload

    @property
    def trace_context(self) -> str | None:
        """JSON: the enqueueing span's context (jobqueue.tracing); a claim may not return the column."""
        return self._row.get("trace_context")  # type: ignore[no-any-return]

    id: int
    type: str
    priority: int
    attempt: int
    retry_count: int
    max_retries: int
    created_at: datetime
    run_at: datetime
    doc_id: int | None
    batch_id: int | None
    from_page: int | None
    to_page: int | None
    owner: str | None
    labels: list[str]
    digest: str | None

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in TASK_FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClaimedTask) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # like the frozen dataclass with a list field it replaced

    def __repr__(self) -> str:
        return "ClaimedTask(" + ", ".join(f"{k}={v!r}" for k, v in self._fields().items()) + ")"


def _column(name: str) -> property:
    return property(lambda self: self._row[name], doc=f"The claimed row's ``{name}``.")


def _moment(name: str) -> property:
    """A timestamp column: the plain claim returns it as microseconds since the epoch (an int), the
    datetime is made here, on first read; a row with a datetime already (claim_flow) is taken as is."""

    def get(self: ClaimedTask) -> datetime:
        value = self._row[name]
        return _EPOCH + timedelta(microseconds=value) if type(value) is int else value

    return property(get, doc=f"The claimed row's ``{name}`` (UTC).")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

for _name in TASK_FIELDS:
    if _name in ("created_at", "run_at"):
        setattr(ClaimedTask, _name, _moment(_name))
    elif _name not in ("payload", "trace_context"):
        setattr(ClaimedTask, _name, _column(_name))
del _name


@dataclass(frozen=True)
class ParentOutcome:
    """How one parent of a task ended (``await ctx.parents()``): what a run_on="always" or "failure"
    callback needs to clean up or mark its document failed."""

    id: int
    type: str
    status: str
    result: Any
    error: str | None


class Context:
    """Passed to every handler as its first argument.

    Everything here is the handler's API, plus the two ends of its channels to the runtime:
    ``take_pending()`` (the progress writer takes what ``progress()`` buffered) and ``request_cancel()``
    (what ``cancelled``, ``raise_if_cancelled()`` and ``progress()`` report). The runtime's own state of
    the attempt (its future, thread, timing, how it was completed) lives in runtime.executor.Attempt.
    """

    # What an attempt starts with, as class attributes: the worker makes thousands of contexts a second
    # and most of them never report progress, get cancelled or store a result.
    _cancelled: threading.Event | None = None
    is_cancelled = False
    cancel_reason: CancelReason | None = None
    result: Any = None
    _lock: threading.Lock | None = None  # created by the first progress() (see _guard)
    _pending_progress: float | None = None
    _pending_lines: deque[str] | None = None
    _dirty = False
    trace: AttemptSpan | None = None  # the attempt's span, when tracing is on (runtime.executor)

    def __init__(
        self,
        task: ClaimedTask,
        *,
        log: logging.Logger,
        transaction: Callable[[Context], contextlib.AbstractAsyncContextManager[Any]] | None = None,
        on_progress: Callable[[Context], None] | None = None,
        connection: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None,
        sql: RuntimeSQL | None = None,
    ) -> None:
        self.task = task
        self._sql = sql
        self.payload: Any = task.payload
        self._logger = log
        self._transaction = transaction
        self._connection = connection
        self._on_progress = on_progress

    @classmethod
    def bound(
        cls,
        *,
        log: logging.Logger,
        transaction: Callable[[Context], contextlib.AbstractAsyncContextManager[Any]],
        on_progress: Callable[[Context], None],
        connection: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
        sql: RuntimeSQL,
    ) -> Callable[[ClaimedTask], Context]:
        """A maker of contexts with these runtime hooks (one per worker): a subclass that holds them
        as class attributes, so each of the thousands of contexts a second sets two attributes."""

        def __init__(self: Context, task: ClaimedTask) -> None:
            self.task = task
            self.payload = task.payload

        hooks = {"_logger": log, "_transaction": transaction, "_on_progress": on_progress,
                 "_connection": connection, "_sql": sql, "__init__": __init__}
        return type(cls.__name__, (cls,), hooks)

    def _guard(self) -> threading.Lock:
        """The lock of the pending progress, made on first use (a handler's thread and the loop may
        both get here first: the one module lock decides)."""
        lock = self._lock
        if lock is None:
            with _FIRST_LOCK:
                lock = self._lock
                if lock is None:
                    lock = self._lock = threading.Lock()
        return lock

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        return logging.LoggerAdapter(self._logger, {"task_id": self.task.id, "task_type": self.task.type})

    @property
    def cancelled(self) -> threading.Event:
        """Set once the task's cancellation (or soft timeout) was requested; created on first use,
        because most handlers never look at it and the worker creates thousands of contexts a second."""
        if self._cancelled is None:
            self._cancelled = threading.Event()
            if self.is_cancelled:
                self._cancelled.set()
        return self._cancelled

    @property
    def id(self) -> int:
        return self.task.id

    @property
    def attempt(self) -> int:
        return self.task.attempt

    def prefix(self) -> str:
        t = self.task
        if t.from_page is not None and t.to_page is not None and t.to_page < 100_000_000:
            return f"Page({t.from_page + 1}~{t.to_page}): "
        return ""

    def line(self, message: str) -> str:
        return f"{clock()} {self.prefix()}{message}"

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        """Report progress (0..1, or -1 for an error) and/or a message line; raises Cancelled once the
        task's cancellation was requested, so sync handlers stop at their next report."""
        self.raise_if_cancelled()
        with self._guard():
            if fraction is not None:
                self._pending_progress = float(fraction)
            if message:
                if self._pending_lines is None:
                    self._pending_lines = deque(maxlen=MAX_PENDING_LINES)
                self._pending_lines.append(self.line(message))
            first = not self._dirty
            self._dirty = True
        if message and self.trace is not None:
            self.trace.progress(fraction, message)
        if first and self._on_progress is not None:
            self._on_progress(self)

    def raise_if_cancelled(self) -> None:
        if self.is_cancelled:
            if self.cancel_reason == CancelReason.TIMEOUT:
                raise TimeoutError(f"task {self.id} exceeded its soft timeout")
            raise Cancelled(f"task {self.id} was cancelled ({self.cancel_reason or 'requested'})")

    def take_pending(self) -> tuple[float | None, str]:
        """Hand the pending progress and lines to the writer (and forget them)."""
        with self._guard():
            value, lines = self._pending_progress, "\n".join(self._pending_lines or ())
            self._pending_progress = None
            if self._pending_lines:
                self._pending_lines.clear()
            self._dirty = False
        return value, lines

    def request_cancel(self, reason: CancelReason) -> None:
        if not self.is_cancelled:
            self.cancel_reason = reason
            self.is_cancelled = True
            if self._cancelled is not None:
                self._cancelled.set()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled asyncpg connection for reads and for writes that need not commit with the task.

        Do slow work (parsing, model calls) between a read on this connection and a short
        ``transaction()`` at the end: a transaction held open for minutes holds back vacuum for the
        whole database, the queue included.
        """
        if self._connection is None:
            raise RuntimeError("this context has no database (process-isolated handlers have none)")
        async with self._connection() as conn:
            yield conn

    async def parents(self) -> list[ParentOutcome]:
        """How each parent of this task (its ``depends_on``) ended, in id order: a callback enqueued
        with ``run_on="always"`` or ``"failure"`` reads which parents failed and why."""
        import json

        if self._sql is None:
            raise RuntimeError("this context has no database (process-isolated handlers have none)")
        async with self.connection() as conn:
            rows = await conn.fetch(self._sql.parent_outcomes, self.id)
        return [ParentOutcome(r["id"], r["type"], r["status"], None if r["result"] is None else json.loads(r["result"]),
                              r["last_error"]) for r in rows]

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction that also completes this task (River's JobCompleteTx).

        Writes made on the yielded connection commit together with the task's ``done`` row, guarded
        by the attempt: if the worker dies before the commit, neither happened and the task runs again;
        if this attempt lost its lease, the block raises LeaseLost and rolls back. Set ``ctx.result``
        inside the block to store a result.
        """
        if self._transaction is None:
            raise RuntimeError("this context has no database (process-isolated handlers cannot use transaction())")
        async with self._transaction(self) as conn:
            yield conn


_clock_cache: tuple[int, str] = (0, "")


def clock() -> str:
    """HH:MM:SS of now, formatted once per second (log lines are written per task)."""
    global _clock_cache
    now = time.time()
    sec = int(now)
    if _clock_cache[0] != sec:
        _clock_cache = (sec, datetime.fromtimestamp(now).strftime("%H:%M:%S"))
    return _clock_cache[1]


AsyncHandler = Callable[[Context, Any], Coroutine[Any, Any, Any]]
