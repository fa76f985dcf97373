"""The pruner: finished tasks older than their retention are deleted in small batches.

Defaults: done and cancelled tasks are kept JOBQ_KEEP_DONE_DAYS (7), failed ones
JOBQ_KEEP_FAILED_DAYS (30); a pass runs at most once a minute per cluster (advisory lock) and
deletes at most ``batch`` rows per statement, each in its own short transaction, so it never holds
locks that claims wait for (claims only touch queued rows; the pruner only finished ones).
Document chunks are never pruned with their tasks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..schema import PRUNER_LOCK_KEY
from ..settings import Settings

PRUNE_EVERY_SECONDS = 60.0
BATCH = 1000
_last_run = 0.0


@dataclass(frozen=True)
class PrunePlan:
    statuses: tuple[str, ...]
    older_than_seconds: float


def default_plans(settings: Settings) -> list[PrunePlan]:
    return [
        PrunePlan(("done", "cancelled"), settings.keep_done_days * 86400),
        PrunePlan(("failed",), settings.keep_failed_days * 86400),
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
    return (f"SELECT count(*) FROM {schema}.tasks "
            "WHERE finished_at < now() - make_interval(secs => $2) AND status = ANY($1::text[])")


async def prune(conn: Any, schema: str, plans: list[PrunePlan], *, batch: int = BATCH,
                dry_run: bool = False, max_batches: int | None = None) -> int:
    """Delete (or, with dry_run, count) what the plans select; returns the number of rows."""
    total = 0
    for plan in plans:
        if dry_run:
            total += int(await conn.fetchval(_count_sql(schema), list(plan.statuses), plan.older_than_seconds))
            continue
        batches = 0
        while max_batches is None or batches < max_batches:
            status = await conn.execute(_delete_sql(schema), list(plan.statuses), plan.older_than_seconds, batch)
            n = int(status.split()[-1])
            total += n
            batches += 1
            if n < batch:
                break
    return total


async def maybe_prune(conn: Any, settings: Settings) -> int:
    """The workers' periodic pass: at most once a minute per process, one process per cluster."""
    global _last_run
    now = time.monotonic()
    if now - _last_run < PRUNE_EVERY_SECONDS:
        return 0
    _last_run = now
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PRUNER_LOCK_KEY):
        return 0
    try:
        return await prune(conn, settings.schema_name, default_plans(settings), max_batches=20)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", PRUNER_LOCK_KEY)
