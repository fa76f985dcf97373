"""Cron schedules: the expression and its time zone, the ticks they produce, and the schedules table.

A schedule is parsed by croniter (the optional extra ``jobq[cron]``), never by hand, and checked where
it is declared (``@task(cron=...)``, ``jobq cron add``): a bad expression or an unknown time zone is
one readable :class:`~jobqueue.errors.ConfigurationError`, not a scheduler that fails later. Ticks are
computed in the schedule's time zone (so ``0 9 * * *`` in Europe/Berlin is 09:00 there, summer and
winter) and stored in UTC.

Exactly one task per tick is the database's job, not this module's: the scheduler
(runtime/maintenance/scheduler.py) inserts each tick's task under the unique key (schedule, tick).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jobqueue.db.queries import CronSQL
from jobqueue.errors import ConfigurationError, JobqError

if TYPE_CHECKING:
    import psycopg

# How far back a pass looks for missed ticks at most, whatever the backfill: enumerating the ticks of
# a per-minute schedule after a month's outage would be 43,200 steps for nothing.
MAX_BACKFILL = 1000


@dataclass(frozen=True)
class Cron:
    """A validated cron expression in a time zone."""

    expr: str
    tz: str = "UTC"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def _iter(self, start: datetime) -> Any:
        from croniter import croniter

        return croniter(self.expr, start.astimezone(self.zone))

    def next_after(self, when: datetime) -> datetime:
        """The first tick strictly after `when`, in UTC."""
        tick: datetime = self._iter(when).get_next(datetime)
        return tick.astimezone(UTC)

    def latest(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """Up to `limit` ticks in (after, until], the latest ones, oldest first (the backfill)."""
        it = self._iter(until + _EPSILON)  # get_prev from just after `until` includes a tick at `until`
        found: list[datetime] = []
        while len(found) < limit:
            tick: datetime = it.get_prev(datetime).astimezone(UTC)
            if tick <= after:
                break
            if tick <= until:  # (a tick inside the epsilon is not due yet)
                found.append(tick)
        return found[::-1]

    def ticks(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Every tick in (after, until], oldest first (tests and `jobq cron ls` previews)."""
        t = self.next_after(after)
        while t <= until:
            yield t
            t = self.next_after(t)


_EPSILON = datetime.resolution * 1000  # a millisecond


def parse(expr: str, tz: str | None = None, *, what: str = "cron") -> Cron:
    """Check a cron expression and time zone; one readable error line for either."""
    try:
        from croniter import croniter
    except ImportError:
        raise ConfigurationError(f"{what}: cron schedules need croniter: pip install 'jobq[cron]'") from None
    if not isinstance(expr, str) or not croniter.is_valid(expr):
        raise ConfigurationError(f"{what}: {expr!r} is not a valid cron expression (e.g. '*/5 * * * *')")
    zone = tz or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(f"{what}: unknown time zone {zone!r} (an IANA name, e.g. 'Europe/Berlin')") from None
    return Cron(expr, zone)


@dataclass(frozen=True)
class Schedule:
    """One row of the schedules table, as `jobq cron ls` shows it (the schedules_due view)."""

    name: str
    type: str
    cron: str
    tz: str
    paused: bool
    source: str
    backfill: int | None
    last_tick: datetime | None
    next_tick: datetime
    next_in_seconds: float
    last_task_id: int | None
    last_task_status: str | None


class Schedules:
    """Run-time changes to the schedules table (``jobq cron``), on a psycopg connection in autocommit."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self.conn = conn
        self.q = CronSQL.load(schema)

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        # psycopg is imported here: the worker's scheduler imports this module for Cron alone, and runs on asyncpg.
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.RawCursor(self.conn, row_factory=dict_row) as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def list(self) -> list[Schedule]:
        return [Schedule(**r) for r in self._rows(self.q.list_schedules, ())]

    def add(self, name: str, type: str, cron: str, *, tz: str | None = None, payload: Any = None,
            priority: int = 0, max_retries: int | None = None, backfill: int | None = None,
            replace: bool = False) -> Schedule:
        """Add (or with `replace`, change) a schedule that lives in the table; refuses a bad one first."""
        from jobqueue.registry import check_schedule

        spec = check_schedule(name, type, cron, tz, backfill)
        text = json.dumps({} if payload is None else payload)
        now = self._rows(self.q.db_now, ())[0]["now"]
        found = self._rows(self.q.add_schedule, (name, type, spec.expr, spec.tz, text, priority, max_retries,
                                                 backfill, spec.next_after(now), replace))
        if not found:
            raise JobqError(f"schedule {name!r} exists already (use --replace to change it)")
        return next(s for s in self.list() if s.name == name)

    def set_paused(self, name: str, paused: bool) -> None:
        """Pause, or resume from the next tick on: the ticks of the pause are not backfilled."""
        rows = self._rows(self.q.get_schedule, (name,))
        if not rows:
            raise JobqError(f"no schedule named {name!r}")
        r = rows[0]
        next_tick = None if paused else Cron(r["cron"], r["tz"]).next_after(r["now"])
        self._rows(self.q.pause_schedule, (name, paused, next_tick))

    def remove(self, name: str) -> None:
        if not self._rows(self.q.remove_schedule, (name,)):
            raise JobqError(f"no schedule named {name!r}")
