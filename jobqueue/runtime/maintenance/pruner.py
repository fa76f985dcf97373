"""The pruner: finished tasks older than their retention are deleted in small batches.

Defaults: done and cancelled tasks are kept JOBQ_KEEP_DONE_DAYS (7), failed ones
JOBQ_KEEP_FAILED_DAYS (30), so a failure stays inspectable long after the successes around it are
gone. Workers run a pass from their heartbeat, one process per cluster at a time (advisory lock).

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

from jobqueue.settings import Settings
from jobqueue.states import PRUNER_LOCK_KEY, TERMINAL, Status

PRUNE_EVERY_SECONDS = 60.0
BATCH = 1000
# A batch that cannot get its locks within this gives up; the next pass tries again.
LOCK_TIMEOUT = "2s"


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


@dataclass
class _State:
    last_run: float = float("-inf")
    backlog: bool = False


_state = _State()


def default_plans(settings: Settings) -> list[PrunePlan]:
    return [
        PrunePlan((Status.DONE, Status.CANCELLED), settings.keep_done_days * 86400),
        PrunePlan((Status.FAILED,), settings.keep_failed_days * 86400),
    ]


def _delete_sql(schema: str) -> str:
    return f"""
        WITH doomed AS (
            SELECT id FROM {schema}.tasks
            WHERE finished_at < now() - make_interval(secs => $2) AND status = ANY($1::text[])
            ORDER BY finished_at
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM {schema}.tasks t USING doomed WHERE t.id = doomed.id"""


def _count_sql(schema: str) -> str:
    return (
        f"SELECT count(*) FROM {schema}.tasks "
        "WHERE finished_at < now() - make_interval(secs => $2) AND status = ANY($1::text[])"
    )


def _workers_sql(schema: str) -> str:
    return f"DELETE FROM {schema}.workers WHERE last_seen < now() - make_interval(secs => $1)"


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
    deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
    total = batches = 0
    more = False
    for plan in plans:
        bad = set(plan.statuses) - set(TERMINAL)
        if bad:
            raise ValueError(f"only finished tasks can be pruned, not {sorted(bad)}")
        if dry_run:
            total += int(
                await conn.fetchval(_count_sql(schema), list(plan.statuses), plan.older_than_seconds)
            )
            continue
        while True:
            if (max_batches is not None and batches >= max_batches) or (
                deadline is not None and time.monotonic() >= deadline
            ):
                more = True
                break
            async with conn.transaction():
                # One pruner per cluster: a transaction-scoped lock per batch (a session lock would
                # leak behind PgBouncer in transaction mode, where its unlock may land elsewhere).
                if exclusive and not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", PRUNER_LOCK_KEY):
                    more = False
                    break
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                n = _affected(
                    await conn.execute(
                        _delete_sql(schema), list(plan.statuses), plan.older_than_seconds, batch
                    )
                )
            total += n
            batches += 1
            if n < batch:
                break
        if more:
            break
    removed_workers = 0
    if workers_older_than is not None and not dry_run:
        removed_workers = _affected(await conn.execute(_workers_sql(schema), workers_older_than))
    return PruneResult(rows=total, batches=batches, more=more, workers=removed_workers)


async def maybe_prune(conn: Any, settings: Settings, *, force: bool = False, batch: int = BATCH) -> int:
    """The workers' periodic pass: once a minute per process (sooner while a backlog remains),
    one process per cluster; returns the number of tasks deleted."""
    now = time.monotonic()
    if not force and not _state.backlog and now - _state.last_run < PRUNE_EVERY_SECONDS:
        return 0
    _state.last_run = now
    result = await prune(
        conn,
        settings.schema_name,
        default_plans(settings),
        batch=batch,
        budget_seconds=max(0.2, min(2.0, settings.heartbeat_seconds * 0.4)),
        workers_older_than=settings.keep_done_days * 86400,
        exclusive=True,
    )
    _state.backlog = result.more
    return result.rows
