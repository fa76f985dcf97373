"""The scheduler: each cron schedule's due ticks become tasks, exactly once per (schedule, tick).

Every worker runs a pass after each heartbeat; no leader is elected. What makes a tick fire once,
across any number of workers, a worker killed mid-pass and a server restart, is the database:

- a pass locks the due schedule rows with SKIP LOCKED (another scheduler's pass skips them, never
  waits), inserts each tick's task under the unique index on tasks (schedule, tick), and moves the
  schedule's next_tick on, all in one transaction: a pass that dies before its commit left nothing,
  and the next pass (any worker's) fires the same ticks;
- the unique key refuses a tick fired before, whoever fired it, even if a schedule's next_tick were
  set back (an operator, a restored backup).

Ticks are computed in Python (croniter, via jobqueue/cron.py) from the schedule's expression and
time zone. A pass looks ahead by the heartbeat interval: a tick due before the next pass is enqueued
now with ``run_at`` = the tick, so the worker's timer starts it on time instead of up to a heartbeat
late. After an outage only the latest ``backfill`` ticks due are fired (default 1: the latest
missed tick runs once; JOBQ_CRON_BACKFILL, or per schedule); the older ones are skipped. A tick less
than GRACE_PASSES (12) passes late, 60 s at least, is always fired: passes lost to schedulers killed
mid-pass or a server restart delay a tick but do not drop it, whatever the backfill.

Code-declared schedules (``@task(cron=...)``) are upserted by the worker's first pass (its own
types only); schedules added with ``jobq cron add`` live in the table alone.

``now`` is a parameter of :meth:`Scheduler.run` so a test can drive a simulated clock; a worker passes
None and the database's clock is used (a worker whose clock is off fires nothing early or late).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from jobqueue.cron import MAX_BACKFILL, Cron
from jobqueue.db.queries import CronSQL
from jobqueue.registry import TaskType

log = logging.getLogger("jobq.worker")

# Schedules one pass fires at most (the rest are due at the next pass).
BATCH = 200  # ~0.3 s of croniter at most: the pass runs in the heartbeat loop
# A tick less late than this many passes (and 60 s at least) is on time, not missed: a few passes lost to
# schedulers killed mid-pass or a restart delay it but do not drop it, whatever the backfill; only
# ticks older than this count as an outage's.
GRACE_PASSES = 12
GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class Fired:
    task_id: int
    schedule: str
    tick: datetime


class Scheduler:
    """One worker's scheduler; ``run`` is one pass in its own transaction. ``every``: the seconds
    between passes (the heartbeat), which sets how late a tick may be before it counts as missed."""

    def __init__(self, schema: str, *, backfill: int = 1, max_retries: int = 3, every: float = 0.0,
                 declare: Iterable[TaskType] = ()) -> None:
        self.q = CronSQL.load(schema)
        self.backfill = backfill
        self.max_retries = max_retries
        self.lookahead = every  # a tick due before the next pass is enqueued now, to run on time
        self.grace = max(GRACE_SECONDS, GRACE_PASSES * every)
        self._declare = [t for t in declare if t.cron is not None]

    async def declare(self, conn: Any) -> None:
        """Upsert the code-declared schedules of this worker's types (once, at its first pass)."""
        crons = sorted(((t, t.cron) for t in self._declare if t.cron is not None), key=lambda p: p[0].name)
        if crons:
            now = await conn.fetchval(self.q.db_now)
            await conn.execute(
                self.q.declare_schedules, [t.name for t, _ in crons], [c.expr for _, c in crons],
                [c.tz for _, c in crons], [t.priority for t, _ in crons], [t.max_retries for t, _ in crons],
                [t.cron_backfill for t, _ in crons], [c.next_after(now) for _, c in crons])
        self._declare = []  # done (a failed attempt is made again at the next pass)

    async def run(self, conn: Any, now: datetime | None = None) -> list[Fired]:
        """Fire the ticks due by `now` (None: the database's clock) plus the lookahead."""
        if self._declare:
            await self.declare(conn)
        async with conn.transaction():
            due = await conn.fetch(self.q.due_schedules, now, self.lookahead, BATCH)
            if not due:
                return []
            names: list[str] = []
            ticks: list[datetime] = []
            moved: list[tuple[str, datetime | None, datetime]] = []
            for s in due:
                cron = Cron(s["cron"], s["tz"])
                clock: datetime = s["now"]
                horizon = clock + timedelta(seconds=self.lookahead)
                after = s["next_tick"] - _EPSILON  # next_tick is the first tick not fired yet
                try:
                    latest = cron.latest(after, clock, min(s["backfill"] or self.backfill, MAX_BACKFILL))
                    on_time = cron.latest(max(after, clock - timedelta(seconds=self.grace)), horizon, MAX_BACKFILL)
                except Exception as exc:  # a row written by hand, or croniter missing: the others still fire
                    log.error("cron: schedule %r cannot be computed (%s); skipped", s["name"], exc)
                    continue
                fire = sorted({*latest, *on_time})
                names += [s["name"]] * len(fire)
                ticks += fire
                moved.append((s["name"], fire[-1] if fire else None, cron.next_after(max(horizon, after))))
            rows = await conn.fetch(self.q.fire_ticks, names, ticks, [m[0] for m in moved], [m[1] for m in moved],
                                    [m[2] for m in moved], self.max_retries)
        return [Fired(r["id"], r["schedule"], r["tick"]) for r in rows]


_EPSILON = timedelta(milliseconds=1)
