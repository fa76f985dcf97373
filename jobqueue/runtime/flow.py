"""Flow-controlled claims: fair claims, per-key concurrency limits, cluster-wide rate limits (issue 14).

The declarations live with the handlers (``@task(..., fair_by=, limit_by=, limit=, rate=, rate_by=)``,
checked in registry.py). Each worker passes its own declaration to the claim as parameters, so a
claim never depends on a table another worker may be rewriting; at start it also stores them in
``flow_rules`` through ``declare_flow`` (the ``flow_control`` view reads them, and that function
builds the type's key index the claim's per-key scans use).

Why the claim is safe across workers:

- a limit, a rate or a ``max_running`` cap makes the claim take the type's cap lock first (the lock
  the plain claim takes for capped types), before the statement whose snapshot then sees every
  claim that committed before; the running counts and the rate window cannot move under it (both
  in the one call of the function ``claim_flow``, migration 0012);
- running tasks are counted from the tasks table itself: a killed worker's tasks keep counting until
  the rescuer requeues them, so a limit is never exceeded, only held a little longer;
- the window's grants and the tasks' ``started_at`` are one clock reading taken under the lock, so
  readings are ordered like the claims and a sliding window audit of ``started_at`` agrees.

A worker held back by a per-key limit (``held``) claims again when a task ends on any worker: it
listens on the finished channel the completers notify (worker.py subscribes only when a type has a
limit), so the key's next task starts then, not at the fetcher's backed-off timer.

Types without a declaration never come here: their claim is the plain ``claim`` statement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobqueue.db.queries import RuntimeSQL
from jobqueue.registry import Flow, TaskType


class FlowClaims:
    """The flow-controlled types of one worker, and how to claim them."""

    def __init__(self, q: RuntimeSQL, specs: Mapping[str, TaskType]) -> None:
        self.q = q
        self.types = list(specs)
        self.rules: dict[str, Flow] = {t: s.flow for t, s in specs.items() if s.flow is not None}
        # After a claim a rate cut short: seconds until its window frees a grant (the fetcher's timer).
        self.wake_in: float | None = None
        # Types with a per-key limit: a worker holding them back waits for a running task of theirs to
        # end anywhere (the completers' NOTIFY on the finished channel), not for its own timer or poll.
        self.limited = {t for t, r in self.rules.items() if r.limit is not None}
        # A limited type got fewer tasks than asked at the last claim: a finished task may free a key.
        self.held = False

    async def declare(self, conn: Any, worker_id: str) -> None:
        """Store this worker's declarations (and forget those of its types that have none now)."""
        stored = {r["type"] for r in await conn.fetch(self.q.flow_declared, self.types)}
        for t in self.types:
            rule = self.rules.get(t)
            if rule is None and t not in stored:
                continue
            if rule is None:
                rule = Flow(key=None)
            await conn.fetchval(self.q.declare_flow, t, rule.key, rule.fair, rule.limit,
                                rule.rate, rule.rate_seconds if rule.rate else None, rule.rate_by_key, worker_id)

    async def claim(self, conn: Any, free: Mapping[str, int], want: int, worker_id: str, lease: float) -> list[Any]:
        """Claim up to `want` tasks of the flow-controlled types with free slots, one type at a time."""
        rows: list[Any] = []
        self.wake_in = None
        self.held = False
        for t, rule in self.rules.items():
            n = min(free.get(t, 0), want - len(rows))
            if n <= 0:
                continue
            got = await conn.fetch(self.q.claim_flow, t, n, worker_id, lease, rule.key, rule.fair, rule.limit,
                                   rule.rate, rule.rate_seconds, rule.rate_by_key,
                                   rule.limit is not None or rule.rate is not None)
            rows += got
            self.held |= t in self.limited and len(got) < n
            if rule.rate is not None and len(got) < n:
                wait = await conn.fetchval(self.q.flow_wait, t, rule.rate_seconds)
                if wait is not None:
                    self.wake_in = max(0.0, min(self.wake_in if self.wake_in is not None else wait, wait))
        return rows
