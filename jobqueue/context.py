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
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import Cancelled

if TYPE_CHECKING:
    import asyncpg

# How many pending message lines a task keeps between two flushes (the log is bounded anyway).
MAX_PENDING_LINES = 64


@dataclass(frozen=True)
class ClaimedTask:
    """The claimed row, as the claim statement returned it."""

    id: int
    type: str
    priority: int
    payload: Any
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


class Context:
    """Passed to every handler as its first argument."""

    def __init__(
        self,
        task: ClaimedTask,
        *,
        log: logging.Logger,
        transaction: Callable[[Context], contextlib.AbstractAsyncContextManager[asyncpg.Connection]] | None = None,
        on_progress: Callable[[Context], None] | None = None,
    ) -> None:
        self.task = task
        self.payload: Any = task.payload
        self.log = logging.LoggerAdapter(log, {"task_id": task.id, "task_type": task.type})
        self.cancelled = threading.Event()
        self.cancel_reason: str | None = None
        self.result: Any = None
        self.completed_in_transaction = False
        self._transaction = transaction
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self._pending_progress: float | None = None
        self._pending_lines: deque[str] = deque(maxlen=MAX_PENDING_LINES)
        self.dirty = False

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
        return f"{datetime.now().strftime('%H:%M:%S')} {self.prefix()}{message}"

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        """Report progress (0..1, or -1 for an error) and/or a message line; raises Cancelled once the
        task's cancellation was requested, so sync handlers stop at their next report."""
        self.raise_if_cancelled()
        with self._lock:
            if fraction is not None:
                self._pending_progress = float(fraction)
            if message:
                self._pending_lines.append(self.line(message))
            first = not self.dirty
            self.dirty = True
        if first and self._on_progress is not None:
            self._on_progress(self)

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            if self.cancel_reason == "timeout":
                raise TimeoutError(f"task {self.id} exceeded its soft timeout")
            raise Cancelled(f"task {self.id} was cancelled ({self.cancel_reason or 'requested'})")

    def take_pending(self) -> tuple[float | None, str]:
        """Hand the pending progress and lines to the writer (and forget them)."""
        with self._lock:
            value, lines = self._pending_progress, "\n".join(self._pending_lines)
            self._pending_progress = None
            self._pending_lines.clear()
            self.dirty = False
        return value, lines

    def request_cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

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


AsyncHandler = Callable[[Context, Any], Coroutine[Any, Any, Any]]
