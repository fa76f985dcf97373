"""The rescuer: tasks whose lease expired go back to the queue (or fail, or end cancelled).

A lease expires when its worker stopped heartbeating: kill -9, OOM, a hung host, a network cut.
Defaults: checked every heartbeat (JOBQ_HEARTBEAT_SECONDS, 5 s) against leases of
JOBQ_LEASE_SECONDS (30 s), so a crashed worker's task runs again within lease + one heartbeat,
not after River's or Oban's one hour. Rescue counts a retry: a task that kills its worker every time
(a parser that segfaults) fails after max_retries instead of looping forever. The fencing token
(`attempt`) makes this safe against a worker that was only slow: its late writes are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobqueue.db.queries import MaintenanceSQL, RuntimeSQL
from jobqueue.states import RESCUER_LOCK_KEY


@dataclass(frozen=True)
class Rescued:
    requeued: int
    failed: int
    cancelled: int


async def rescue(conn: Any, q: MaintenanceSQL, rq: RuntimeSQL, *, log_chars: int) -> Rescued:
    """One rescue pass in its own transaction; returns what it did (nothing if another worker holds the lock)."""
    async with conn.transaction():
        rows = await conn.fetch(q.rescue, RESCUER_LOCK_KEY, log_chars)
        dead = [r["id"] for r in rows if r["status"] in ("failed", "cancelled") and r["has_dependents"]]
        if dead:
            await conn.fetch(rq.cancel_dependents, dead, "[Canceled] a parent task did not complete", log_chars)
    return Rescued(
        requeued=sum(1 for r in rows if r["status"] == "queued"),
        failed=sum(1 for r in rows if r["status"] == "failed"),
        cancelled=sum(1 for r in rows if r["status"] == "cancelled"),
    )
