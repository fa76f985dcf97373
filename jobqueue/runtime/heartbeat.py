"""The heartbeat: leases by (id, attempt), cancel confirmation, and the maintenance schedule.

- Every `heartbeat_seconds` (jittered) one statement registers the worker and renews the lease of
  each attempt it runs, named by (id, attempt): after this worker re-claimed a task it had lost, only
  the new attempt is renewed. Rows are locked in id order and locked rows are skipped, never waited
  for (a producer holding a parent row, an operator's open UPDATE): they are renewed by the next beat,
  well within the lease. An attempt that is no longer ours has its handler cancelled (the zombie case).
  The same statement records how many hard-timed-out sync handlers' threads still hold a slot
  (`workers.abandoned`), so `jobq top` can say why a worker runs fewer tasks than its concurrency.
- A cancel NOTIFY is a hint, never an order: any role can call pg_notify. The hinted attempts are
  checked in the table (`cancel_requested_at`, still ours) before a handler is cancelled; the beat's
  own cancel flag is the fallback for a NOTIFY that never came. A hint for an id that is not running
  here is kept a few seconds: it may be for a row this worker has claimed but not dispatched yet.
  When the LISTEN (re)connects, the attempts running here are checked at once: a cancel sent while
  nothing listened (a worker claims before its LISTEN is up) does not wait for the beat.
- Maintenance (the rescuer every beat, the pruner on its own schedule) runs after the beat, each
  service taking its advisory lock so one worker of the cluster does the work. The scheduler of
  cron tasks runs every beat too; it needs no lock (maintenance/scheduler.py says why).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from jobqueue import __version__
from jobqueue.db.connect import redact_text
from jobqueue.observe import metrics
from jobqueue.runtime import prefetch
from jobqueue.runtime.maintenance import rescuer
from jobqueue.runtime.maintenance.pruner import PruneSchedule
from jobqueue.runtime.maintenance.scheduler import Scheduler
from jobqueue.runtime.supervise import is_transient
from jobqueue.states import CancelReason

if TYPE_CHECKING:
    from jobqueue.runtime.worker import Worker

log = logging.getLogger("jobq.worker")

# How long, and how many, cancel hints for ids not running here are kept (Heartbeat._keep_early).
_EARLY_SECONDS = 5.0
_EARLY_MAX = 4096


class Heartbeat:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.prune = PruneSchedule(worker.settings)
        s = worker.settings
        self.scheduler = Scheduler(s.schema_name, backfill=s.cron_backfill, max_retries=s.max_retries,
                                   every=worker.heartbeat_every, declare=worker.specs.values())
        self._hints: dict[int, int | None] = {}
        self._confirming: asyncio.Task[None] | None = None
        # Hints for ids not running here, by arrival (monotonic seconds): the cancel may be for a task
        # whose claim has committed but whose rows this worker has not dispatched yet.
        self._early: dict[int, tuple[int | None, float]] = {}
        # Set when the LISTEN (re)connects: the rows of the claim then in flight are checked once dispatched.
        self._unheard_claim = False

    async def beat(self) -> None:
        w = self.w
        pairs = w.running_pairs()
        abandoned = len(w.dispatcher.abandoned)  # threads past their hard timeout, still holding slots

        async def once(conn: Any) -> tuple[list[Any], list[Any]]:
            rows = await conn.fetch(
                w.q.heartbeat, w.id, w.host, os.getpid(), w.types, w.concurrency, __version__, w.lease,
                [p[0] for p in pairs], [p[1] for p in pairs], abandoned)
            capped = await conn.fetch(w.q.capped_types, w.types)
            return rows, capped

        rows, capped = await w._db(once)
        w.fetcher.capped = {r["type"] for r in capped}
        for r in rows:
            run = w._running.get(r["id"])
            if run is None or run.ctx.attempt != r["attempt"]:
                if not r["ours"]:  # claimed ahead and lost meanwhile: nothing of it to write
                    w.dispatcher.drop_ahead(r["id"], r["attempt"])
                elif r["cancel_requested"]:
                    w.dispatcher.cancel_ahead(r["id"], r["attempt"])
                continue  # finished (or re-claimed) meanwhile
            if not r["ours"]:
                if not run.completed_in_transaction:
                    log.warning("task %d attempt %d is no longer ours (lease lost); cancelling its handler",
                                r["id"], r["attempt"])
                    w.executor.cancel(run, CancelReason.LOST)
            elif r["cancel_requested"]:
                w.executor.cancel(run, CancelReason.USER)
        skipped = sum(1 for r in rows if r["ours"] and not r["renewed"])
        if skipped:
            log.info("%d lease(s) not renewed this beat (row locked by another transaction); next beat", skipped)
        released = w.dispatcher.release_ahead(prefetch.MAX_WAIT)
        if released:
            log.info("released %d task(s) claimed ahead that waited over %gs for a slot (their handlers "
                     "are no longer short)", released, prefetch.MAX_WAIT)

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.w.heartbeat_every * random.uniform(0.9, 1.0))
            await self.beat()
            if self.w.maintenance:
                await self.maintain()

    async def maintain(self) -> None:
        """One pass of the maintenance services. A transient error skips the pass (the next beat runs
        it again); anything else propagates to the supervisor of the loop."""
        w = self.w
        assert w._pool is not None
        try:
            async with w._pool.acquire() as conn:
                rescued = await rescuer.rescue(conn, w.mq, w.q, log_chars=w.log_chars)
                if rescued.requeued or rescued.failed or rescued.cancelled:
                    n = rescued.requeued + rescued.failed + rescued.cancelled
                    w.stats.rescued += n
                    metrics.RESCUED.inc(n)
                    log.warning("rescued %d task(s) with expired leases (%d requeued, %d failed, %d cancelled)",
                                n, rescued.requeued, rescued.failed, rescued.cancelled)
                await self.prune.run(conn)
                fired = await self.scheduler.run(conn)
                if fired:
                    names = ", ".join(sorted({f.schedule for f in fired}))
                    log.info("cron: enqueued %d task(s) for %s", len(fired), names)
        except Exception as exc:
            if not is_transient(exc):
                raise
            w.outage.failed(exc, "maintenance")
            log.info("maintenance skipped: %s", redact_text(str(exc)))

    # ------------------------------------------------------------------ cancel hints

    def cancel_hint(self, payload: str) -> None:
        """A NOTIFY on the cancel channel (`id` or `id:attempt`): check it in the database, soon."""
        task_id, _, attempt = payload.partition(":")
        try:
            tid, att = int(task_id), int(attempt) if attempt else None
        except ValueError:
            return
        if self.w.dispatcher.owns(tid) is None:
            self._keep_early(tid, att)
            return
        self._hint(tid, att)

    def _hint(self, tid: int, att: int | None) -> None:
        self._hints[tid] = att
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.create_task(self._confirm(), name="jobq-cancel-confirm")

    def _keep_early(self, tid: int, att: int | None) -> None:
        """Between a claim's commit and the dispatch of its rows, the task is `running` in the table
        but not in this worker's map; a cancel NOTIFY in that window would be dropped and the cancel
        wait for the next beat. It is kept a while instead: most are for other workers' tasks, so the
        map is bounded by age and size."""
        now = time.monotonic()
        early = self._early
        early.pop(tid, None)
        early[tid] = (att, now)
        while early:  # oldest first: a dict keeps insertion order
            oldest = next(iter(early))
            if len(early) <= _EARLY_MAX and now - early[oldest][1] <= _EARLY_SECONDS:
                break
            del early[oldest]

    def claimed(self, rows: Iterable[Any]) -> None:
        """The claim's rows were dispatched: a hint that came early for one of them is confirmed now,
        and every one of them if the claim may have committed while nothing was listening."""
        unheard, self._unheard_claim = self._unheard_claim, False
        if not self._early and not unheard:
            return
        horizon = time.monotonic() - _EARLY_SECONDS
        for r in rows:
            kept = self._early.pop(r["id"], None)
            if (self.w.dispatcher.owns(r["id"]) is not None
                    and (unheard or (kept is not None and kept[1] >= horizon))):
                self._hint(r["id"], None if kept is None else kept[0])

    def listening(self) -> None:
        """The LISTEN (re)connected. A worker claims from its start, before its LISTEN is up, and goes on
        claiming through a reconnect: a cancel sent meanwhile was heard by nobody. Every attempt running
        here is checked in the table now, and the rows of the claim in flight once they are dispatched."""
        self._unheard_claim = True
        for tid in [*self.w._running, *self.w.dispatcher.ahead.waiting]:
            self._hint(tid, None)

    async def _confirm(self) -> None:
        w = self.w
        while self._hints:
            hints, self._hints = self._hints, {}
            pairs = [(tid, mine) for tid, att in hints.items()
                     if (mine := w.dispatcher.owns(tid)) is not None and att in (None, mine)]
            if not pairs:
                continue
            try:
                rows = await w._db(self._check, [p[0] for p in pairs], [p[1] for p in pairs])
            except Exception:
                log.exception("could not confirm a cancel request; the next heartbeat checks again")
                return
            for r in rows:
                run = w._running.get(r["id"])
                if run is not None and run.ctx.attempt == r["attempt"]:
                    w.executor.cancel(run, CancelReason.USER)
                else:  # still waiting for a slot: it ends cancelled, its handler never runs
                    w.dispatcher.cancel_ahead(r["id"], r["attempt"])

    async def _check(self, conn: Any, ids: list[int], attempts: list[int]) -> list[Any]:
        rows: list[Any] = await conn.fetch(self.w.q.confirm_cancel, self.w.id, ids, attempts)
        return rows
