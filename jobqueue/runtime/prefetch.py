"""Prefetch: tasks claimed ahead of a free slot, for handlers shorter than a claim's round trip.

Why (issue 12, target 7): a worker that claims only into free slots pays a claim round trip for
every `concurrency` tasks; at concurrency 1 with short handlers that is a round trip per task, and
the drain ran at 7 % of its rate at concurrency 100. So, for a type that has a free slot, a claim also
takes as many tasks as the type's slots finish during one claim round trip (its limit x the claim's
seconds / the handler's seconds, both running means), at most ``prefetch`` for the worker. They wait
here in claim order and start as slots free, each about one claim round trip later than it would have.

A waiting task is `running` in the table and this worker's, so everything that protects a running
task covers it (the dispatcher and the heartbeat ask here):

* its lease is renewed with the running attempts' (``Dispatcher.running_pairs``);
* a cancel hint for it is confirmed in the table like one for a running attempt, and a confirmed
  cancel ends it as cancelled without running its handler; one the beat finds no longer ours is dropped;
* a shutdown releases every waiting task at once (back to `queued`, nothing run), before the grace period;
* handlers that turn long: nothing is claimed ahead for a type without a free slot, one long attempt
  pulls the type's mean up at once (a mean of 0.2 weight on each new attempt), and a task that waited
  more than ``MAX_WAIT`` is released at the next beat, with the type claiming none ahead until its
  handlers are seen short again;
* types under flow control or a cluster-wide cap are never claimed ahead: a waiting task would hold
  room that the key's or the cap's running tasks are counted against.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Container
from typing import Any

# A task waiting here longer than this is released (checked at each heartbeat): its type's handlers
# are no longer short, and another worker may have a free slot.
MAX_WAIT = 1.0
# Weight of each new handler duration in its type's running mean.
_WEIGHT = 0.2


class Ahead:
    """The tasks claimed ahead of a free slot, by type in claim order, and the running means that say
    how many to claim."""

    def __init__(self, prefetch: int) -> None:
        self.prefetch = max(0, prefetch)
        self._rows: dict[str, deque[tuple[int, float, Any]]] = {}
        self.waiting: dict[int, int] = {}  # task id -> attempt, of every task waiting here
        self._seq = 0
        self.took: dict[str, float] = {}  # mean seconds of a handler, by type
        self.claim_seconds: float | None = None  # mean seconds of a claim round trip

    # ------------------------------------------------------------------ how many

    def ended(self, task_type: str, seconds: float) -> None:
        d = self.took.get(task_type)
        self.took[task_type] = seconds if d is None else d + _WEIGHT * (seconds - d)

    def claimed(self, seconds: float) -> None:
        c = self.claim_seconds
        self.claim_seconds = seconds if c is None else c + _WEIGHT * (seconds - c)

    def room(self, free: dict[str, int], limits: dict[str, int], never: Container[str]) -> dict[str, int]:
        """How many tasks of each type the next claim may take beyond its free slots."""
        out = dict.fromkeys(free, 0)
        left = self.prefetch - len(self.waiting)
        c = self.claim_seconds
        if left <= 0 or c is None:
            return out
        for t, f in free.items():
            d = self.took.get(t)
            if f <= 0 or d is None or t in never:
                continue
            waiting = len(self._rows.get(t, ()))
            n = min(left, int(limits[t] * c / max(d, 1e-6)) - waiting)
            if n > 0:
                out[t] = n
                left -= n
        return out

    # ------------------------------------------------------------------ the waiting tasks

    def has(self, task_type: str) -> bool:
        return bool(self._rows.get(task_type))

    def put(self, row: Any) -> None:
        self._seq += 1
        self._rows.setdefault(row["type"], deque()).append((self._seq, time.monotonic(), row))
        self.waiting[row["id"]] = row["attempt"]

    def pop(self, startable: Callable[[str], bool]) -> Any | None:
        """The earliest claimed task among the types that can start one now (None: none)."""
        best: deque[tuple[int, float, Any]] | None = None
        for t, q in self._rows.items():
            if q and startable(t) and (best is None or q[0][0] < best[0][0]):
                best = q
        if best is None:
            return None
        row = best.popleft()[2]
        del self.waiting[row["id"]]
        return row

    def take(self, task_id: int) -> Any | None:
        """Remove one waiting task (cancelled, or no longer ours); None when it is not waiting here."""
        if self.waiting.pop(task_id, None) is None:
            return None
        for q in self._rows.values():
            for item in q:
                if item[2]["id"] == task_id:
                    q.remove(item)
                    return item[2]
        return None  # pragma: no cover - `waiting` and `_rows` are changed together

    def take_all(self, waited: float = 0.0) -> list[Any]:
        """Remove the tasks that have waited at least `waited` seconds (all of them by default); a type
        that had one is taken as long-running: nothing of it is claimed ahead until it is seen short."""
        horizon = time.monotonic() - waited
        out: list[Any] = []
        for t, q in self._rows.items():
            if q and q[0][1] <= horizon and waited:
                self.took[t] = max(self.took.get(t, 0.0), waited)
            while q and q[0][1] <= horizon:
                row = q.popleft()[2]
                del self.waiting[row["id"]]
                out.append(row)
        return out
