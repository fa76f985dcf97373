"""The pruner: finished tasks older than their retention are deleted in small batches.

Defaults: done and cancelled tasks are kept JOBQ_KEEP_DONE_DAYS (7), failed ones
JOBQ_KEEP_FAILED_DAYS (30), so a failure stays inspectable long after the successes around it are
gone. Each worker's heartbeat runs a pass through its own PruneSchedule (every PRUNE_EVERY_SECONDS,
60 s; batches of BATCH, 1000 rows), one process per cluster at a time (advisory lock).

Why it never gets in the way of the queue:

- each batch is its own short transaction deleting at most ``batch`` rows picked through
  tasks_finished_idx (oldest first) with SKIP LOCKED, and claims only ever lock queued rows, so a
  claim never waits for the pruner nor the pruner for a claim;
- a pass stops after a time budget well under the heartbeat interval, because it runs inside the
  heartbeat loop and a long pass would delay lease renewals;
- a pass that stopped with rows left (a big backlog after an outage, or retention just lowered)
  runs again at the next heartbeat instead of waiting the usual minute, so deletion keeps up with
  any completion rate the budget allows.

Document chunks are never pruned with their tasks: chunks.task_id is ON DELETE SET NULL, so the
text survives and only loses the link to the task that wrote it. Worker rows not seen for the done
retention are removed too: a crashed worker never marks itself stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from jobqueue.db.queries import MaintenanceSQL
from jobqueue.settings import Settings
from jobqueue.states import PRUNER_LOCK_KEY, TERMINAL, Status

# Defaults of the service (the retention itself comes from the settings, see above).
PRUNE_EVERY_SECONDS = 60.0  # a worker's pass runs at most once a minute, sooner while a backlog remains
BATCH = 1000  # rows per transaction
LOCK_TIMEOUT = "2s"  # a batch that cannot get its locks within this gives up; the next pass tries again


@dataclass(frozen=True)
class PrunePlan:
    statuses: tuple[str, ...]
    older_than_seconds: float


@dataclass(frozen=True)
class PruneResult:
    rows: int
    batches: int
    # True when the pass stopped (batch or time budget) before deleting everything eligible.
    more: bool
    workers: int = 0


def default_plans(settings: Settings) -> list[PrunePlan]:
    return [
        PrunePlan((Status.DONE, Status.CANCELLED), settings.keep_done_days * 86400),
        PrunePlan((Status.FAILED,), settings.keep_failed_days * 86400),
    ]


def _affected(status: str) -> int:
    return int(status.split()[-1])


async def prune(
    conn: Any,
    schema: str,
    plans: list[PrunePlan],
    *,
    batch: int = BATCH,
    dry_run: bool = False,
    max_batches: int | None = None,
    budget_seconds: float | None = None,
    workers_older_than: float | None = None,
    exclusive: bool = False,
) -> PruneResult:
    """Delete (or, with dry_run, count) what the plans select, one short transaction per batch.

    ``conn`` is an asyncpg connection outside any transaction. ``max_batches`` and
    ``budget_seconds`` bound one pass; ``more`` in the result says whether it stopped early.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    q = MaintenanceSQL.load(schema)
    deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
    total = batches = 0
    more = False
    for plan in plans:
        bad = set(plan.statuses) - set(TERMINAL)
        if bad:
            raise ValueError(f"only finished tasks can be pruned, not {sorted(bad)}")
        if dry_run:
            total += int(await conn.fetchval(q.prune_count, list(plan.statuses), plan.older_than_seconds))
            continue
        while True:
            if (max_batches is not None and batches >= max_batches) or (
                deadline is not None and time.monotonic() >= deadline
            ):
                more = True
                break
            async with conn.transaction():
                if exclusive and not await conn.fetchval(q.prune_lock, PRUNER_LOCK_KEY):
                    more = False
                    break
                await conn.fetchval(q.prune_lock_timeout, LOCK_TIMEOUT)
                n = _affected(await conn.execute(q.prune_delete, list(plan.statuses), plan.older_than_seconds,
                                                 batch))
            total += n
            batches += 1
            if n < batch:
                break
        if more:
            break
    removed_workers = 0
    if workers_older_than is not None and not dry_run:
        removed_workers = _affected(await conn.execute(q.prune_workers, workers_older_than))
    return PruneResult(rows=total, batches=batches, more=more, workers=removed_workers)


class PruneSchedule:
    """One worker's pruning schedule (each Worker owns one: no state shared through the module)."""

    def __init__(self, settings: Settings, *, every_seconds: float = PRUNE_EVERY_SECONDS) -> None:
        self.settings = settings
        self.every = every_seconds
        self.last_run = float("-inf")
        self.backlog = False

    def due(self) -> bool:
        return self.backlog or time.monotonic() - self.last_run >= self.every

    async def run(self, conn: Any, *, force: bool = False, batch: int = BATCH) -> int:
        """The periodic pass: once per `every` seconds (at once while a backlog remains), one process
        per cluster (advisory lock); returns the number of tasks deleted."""
        if not force and not self.due():
            return 0
        self.last_run = time.monotonic()
        s = self.settings
        result = await prune(
            conn,
            s.schema_name,
            default_plans(s),
            batch=batch,
            # the pass runs in the heartbeat loop: it must end well before the next beat is due
            budget_seconds=max(0.2, min(2.0, s.heartbeat_seconds * 0.4)),
            workers_older_than=s.keep_done_days * 86400,
            exclusive=True,
        )
        self.backlog = result.more
        return result.rows
