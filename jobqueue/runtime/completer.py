"""The completer: writes the executor's acks, every outcome kind, in batches.

All acks that arrived while the previous batch was being written go out together in ONE statement
(``finish_many``, River's ``JobSetStateIfRunningMany``): done, retry, failed, snoozed, cancelled and
released alike, guarded by (id, attempt, worker_id, status = 'running') and locked in id order. A batch
of successes only, the common case, takes ``complete_many`` instead: the same fence and lock order
without the other outcomes' expressions (measured 2.7 against 3.3 ms per 100 tasks), and alone,
outside a transaction block: BEGIN and COMMIT were two of its three round trips (and ~90 us of the
worker's CPU) per batch. In the same transaction as their outcome, the dependents of the batch's
tasks are released (done) or cancelled (failed, cancelled): so complete_many alone leaves out the
tasks that have dependents, and they are written again in a transaction. A row the database
refuses does not cost the batch: the batch is split until the bad ack is alone, which is then
recorded as a failure carrying the database's reason.

Back-pressure (issue 12, "a collapse"): a handler's slot is free when it returns, but its task stays
`running` in the table until its ack commits. Without a bound, a completer that falls behind lets the
fetcher claim far ahead of it, the batches grow, each gets slower per row, and a crash then re-runs
thousands of finished tasks. So a batch holds at most ``batch_cap`` acks, and the fetcher claims only
while the attempts running plus the acks not yet committed (``unwritten``) stay within ``bound``
(2 x ``batch_cap``): acks that are not committed never exceed the bound. ``stats.max_unwritten`` is
the high-water mark (what tests/test_runtime_backpressure.py and ``bench profile`` read).

``transaction()`` is the other way in: ``ctx.transaction()`` writes its task's done row on the
handler's own connection, so the handler's writes commit with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from jobqueue.db.connect import redact_text
from jobqueue.db.queries import RuntimeSQL
from jobqueue.errors import LeaseLost
from jobqueue.runtime.context import clock
from jobqueue.runtime.executor import Ack, Attempt, clean_text, json_result, take_pending
from jobqueue.states import CancelReason, Outcome, Status

if TYPE_CHECKING:
    from jobqueue.runtime.worker import WorkerStats

log = logging.getLogger("jobq.worker")

# The most acks in one statement; the fetcher keeps running + unwritten acks within twice this.
BATCH = 1000
# SQLSTATE classes of errors caused by one row's values (data exception, integrity, program limit):
# retrying the same batch cannot help, so the row is isolated and recorded as failed instead.
ROW_ERROR_CLASSES = ("22", "23", "54")


def row_error(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and str(getattr(exc, "sqlstate", ""))[:2] in ROW_ERROR_CLASSES


class Completer:
    def __init__(
        self,
        q: RuntimeSQL,
        *,
        worker_id: str,
        log_chars: int,
        stats: WorkerStats,
        db: Callable[..., Awaitable[Any]],
        connection: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
        on_requeued: Callable[[datetime], None],
        on_written: Callable[[], None] = lambda: None,
        batch_cap: int = BATCH,
    ) -> None:
        self.q = q
        self.worker_id = worker_id
        self.log_chars = log_chars
        self.stats = stats
        self._db = db  # Worker._db: retries what is transient
        self._connection = connection
        self._on_requeued = on_requeued
        self._on_written = on_written  # room for more claims: wakes the fetcher
        self.batch_cap = max(1, batch_cap)
        self.pending: list[Ack] = []
        self.in_flight: list[Ack] = []  # the batch being written
        self._event = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def bound(self) -> int:
        """The most attempts this worker may hold between claim and committed ack (running or unwritten)."""
        return 2 * self.batch_cap

    @property
    def unwritten(self) -> int:
        """Acks whose handler returned but whose outcome is not committed yet."""
        return len(self.pending) + len(self.in_flight)

    def add(self, ack: Ack) -> None:
        self.add_many([ack])

    def add_many(self, acks: list[Ack]) -> None:
        if not acks:
            return
        self.pending += acks
        n = len(self.pending) + len(self.in_flight)
        if n > self.stats.max_unwritten:
            self.stats.max_unwritten = n
        self._event.set()

    async def run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write every pending ack; returns only when nothing is pending or in flight (the lock makes
        a caller wait for a flush another coroutine started)."""
        async with self._lock:
            while self.pending:
                cap = self.batch_cap
                batch, self.pending = self.pending[:cap], self.pending[cap:]
                self.in_flight = batch
                try:
                    await self._write_safely(batch)
                finally:
                    self.in_flight = []
                self._on_written()

    async def _write_safely(self, batch: list[Ack], *, last_resort: bool = False, alone: bool = True) -> None:
        """Write `batch`, isolating a row the database refuses. A batch of successes goes out (`alone`)
        as complete_many on its own, outside a transaction block (two round trips fewer); the tasks
        it holds back because they have dependents are written again, in a transaction."""
        held: list[Ack] = []
        try:
            if alone and all(ack.outcome is Outcome.DONE for ack in batch):
                held = await self._db(self._complete_alone, batch)
            else:
                await self._db(self._write_tx, batch)
        except BaseException as exc:
            if not row_error(exc):
                self.pending[:0] = batch  # not written: a restarted completer writes it
                raise
            if len(batch) > 1:  # split until the refused ack is alone
                half = len(batch) // 2
                try:
                    await self._write_safely(batch[:half], alone=alone)
                except BaseException:
                    self.pending.extend(batch[half:])  # the first half put itself back
                    raise
                await self._write_safely(batch[half:], alone=alone)
                return
            ack, reason = batch[0], redact_text(str(exc))
            if last_resort:
                log.error("task %d: could not record even the failure of attempt %d (%s); its lease will "
                          "expire and the rescuer requeues it", ack.id, ack.attempt, reason)
                return
            log.error("task %d: the database refused outcome %s of attempt %d (%s); recording it as failed",
                      ack.id, ack.outcome, ack.attempt, reason)
            error = clean_text(f"the worker could not record this attempt's outcome ({ack.outcome}): {reason}")
            failed = ack._replace(outcome=Outcome.FAILED, result=None, error=error,
                                         line=f"{clock()} [ERROR] {error[:500]}")
            await self._write_safely([failed], last_resort=True)
            return
        if held:
            await self._write_safely(held, last_resort=last_resort, alone=False)

    async def _complete_alone(self, conn: asyncpg.Connection, batch: list[Ack]) -> list[Ack]:
        """complete_many for a batch of successes, outside a transaction block; returns the acks of the
        tasks it left out because they have dependents."""
        _, ids, attempts, _, lines, results, *_ = zip(*batch, strict=True)
        summary = await self._complete_many(conn, ids, attempts, results, lines, hold=True)
        held = set(summary["held"])
        rejected = len(batch) - summary["written"] - len(held)
        if rejected:
            log.warning("%d outcome(s) rejected: the attempt is no longer ours (lease lost)", rejected)
        return [ack for ack in batch if ack.id in held] if held else []

    async def _complete_many(self, conn: asyncpg.Connection, ids: Sequence[int], attempts: Sequence[int],
                             results: tuple[str | None, ...], lines: Sequence[str], *, hold: bool) -> asyncpg.Record:
        # No results at all (no-op handlers): no array to encode, unnest pads the missing one with NULLs.
        summary = await conn.fetchrow(self.q.complete_many, ids, attempts,
                                      None if results.count(None) == len(results) else results, lines,
                                      self.log_chars, self.worker_id, hold)
        assert summary is not None  # an aggregate: always one row
        self.stats.done += summary["written"]
        return summary

    async def _write_tx(self, conn: asyncpg.Connection, batch: list[Ack]) -> None:
        async with conn.transaction():
            written = await self.write(conn, batch)
        if written < len(batch):
            log.warning("%d outcome(s) rejected: the attempt is no longer ours (lease lost)", len(batch) - written)

    async def write(self, conn: asyncpg.Connection, batch: list[Ack]) -> int:
        """finish_many (or complete_many) and the dependents, on `conn` inside the caller's transaction;
        returns how many of the batch's rows were written (the others are no longer ours)."""
        # One transposition (C speed) instead of a list comprehension per column.
        outcomes, ids, attempts, _, lines, results, errors, secs, caps = zip(*batch, strict=True)
        if outcomes.count(Outcome.DONE) == len(outcomes):
            # Only successes: the lean statement, same fence and lock order, one row back.
            summary = await self._complete_many(conn, ids, attempts, results, lines, hold=False)
            await self._dependents(conn, summary["parents"], [], [])
            written: int = summary["written"]
            return written
        rows = await conn.fetch(
            self.q.finish_many, ids, attempts, [o.value for o in outcomes], results, errors, lines, secs, caps,
            self.log_chars, self.worker_id)

        def parents(status: Status) -> list[int]:
            return [r["id"] for r in rows if r["status"] == status and r["has_dependents"]]

        await self._dependents(conn, parents(Status.DONE), parents(Status.FAILED), parents(Status.CANCELLED))
        self._count(rows)
        return len(rows)

    async def _dependents(self, conn: asyncpg.Connection, done: list[int], failed: list[int],
                          cancelled: list[int]) -> None:
        """Release the children of done parents and cancel those of failed or cancelled ones, in the
        outcome's transaction; a run_on="failure" child whose parents all succeeded is cancelled too."""
        if done:
            released = await conn.fetch(self.q.release_dependents, done,
                                        f"{clock()} [Canceled] no parent task failed", self.log_chars)
            # Children cancelled on release (run_on="failure", every parent succeeded): cancel theirs too.
            cancelled = cancelled + [r["id"] for r in released if r["id"] is not None and r["has_dependents"]]
        for dead, verb in ((failed, "failed"), (cancelled, "was cancelled")):
            if dead:
                names = ", ".join(map(str, dead[:20])) + (", ..." if len(dead) > 20 else "")
                await conn.fetch(self.q.cancel_dependents, dead,
                                 f"{clock()} [Canceled] parent task {names} {verb}", self.log_chars)

    def _count(self, rows: list[asyncpg.Record]) -> None:
        requeued: list[datetime] = []
        for r in rows:
            status = r["status"]
            if status == Status.DONE:
                self.stats.done += 1
            elif status == Status.FAILED:
                self.stats.failed += 1
            elif status == Status.CANCELLED:
                self.stats.cancelled += 1
            elif status == Status.QUEUED:
                requeued.append(r["run_at"])
                if r["outcome"] == Outcome.RETRY:
                    self.stats.retried += 1
        if requeued:
            self._on_requeued(min(requeued))

    @contextlib.asynccontextmanager
    async def transaction(self, a: Attempt) -> AsyncIterator[Any]:
        """ctx.transaction(): the handler's writes and its task's done row commit together."""
        ctx = a.ctx
        async with self._connection() as conn, conn.transaction():
            yield conn
            if ctx.cancel_reason in (CancelReason.USER, CancelReason.LOST, CancelReason.SHUTDOWN):
                raise asyncio.CancelledError()
            _, lines = take_pending(ctx)
            ack = Ack(Outcome.DONE, ctx.id, ctx.attempt, ctx.task.type,
                      "\n".join(filter(None, [lines, ctx.line("Done.")])), json_result(ctx.result))
            if not await self.write(conn, [ack]):
                raise LeaseLost(f"task {ctx.id} attempt {ctx.attempt} is no longer ours")
        a.completed_in_transaction = True
