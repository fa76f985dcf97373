"""The fetcher: claims tasks into free slots, and decides when to try again.

It claims up to the free slots in one statement (priority order, SKIP LOCKED), plus, for types whose
handlers are shorter than a claim's round trip, what those slots finish meanwhile (prefetch.py), and
is woken by:
a NOTIFY on a type's channel (its payload is the task's run_at, read against the database's clock),
a timer for the earliest scheduled task, a freed slot of a type that was held back, the LISTEN
connection (re)connecting, or the fallback poll.

Why the wake-ups are computed the way they are (issue 11):

- after a claim that found nothing, one statement (`next_wake`) returns the delay to the earliest
  runnable task *in the database's clock*, for the types that could be claimed only: paused types
  and types at their cluster-wide `max_running` are left out, so they never arm a timer that fires
  at once (the tight re-claim loop of a paused or capped type), and a worker whose clock runs ahead
  never wakes early and spins;
- the same statement refreshes which types have a cap; the claim itself refuses a capped type the
  caller did not check under the cap lock, so a cap set a moment ago holds from the next claim;
- a timer that finds a runnable task it cannot get (another worker holds it) backs off instead of
  firing again at once;
- every database call goes through the one retry of `supervise`, so an outage costs one log line.

Back-pressure from the completer (issue 12): a claim never takes more than the room left under the
completer's bound (attempts running + acks not yet committed <= ``Completer.bound``), so a completer that
falls behind stops the claims instead of letting finished-but-unrecorded tasks pile up; each committed
batch frees room and wakes the loop (``room_freed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from jobqueue.observe import metrics

if TYPE_CHECKING:
    from jobqueue.runtime.worker import Worker

# A timer for a task that is already runnable (but was not ours to take) waits at least this, doubling
# while it keeps happening, up to the poll interval.
MIN_REARM_SECONDS = 0.005
# A worker held back by a per-key limit claims again this long after a task ends anywhere: the
# notifications of a busy cluster (one per completed batch of every worker) make at most one claim
# per interval, for 20 ms of delay.
FINISHED_COALESCE_SECONDS = 0.02


class Fetcher:
    """The claim loop of one Worker (which owns the running map and runs what is claimed)."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.wake = asyncio.Event()
        self.backlog = True
        # Types with a max_running cap (refreshed by every heartbeat and every empty claim).
        self.capped: set[str] = set()
        # Types held back at the last empty claim (no free local slot, or capped): a freed slot of one
        # of them is worth a claim even though the queue looked empty for the others.
        self.held: set[str] = set()
        # database clock minus local clock, learned from next_wake; NOTIFY payloads are database times
        self.clock_offset = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._rearms = 0
        # Clear while a claim is in flight: its rows are committed `running` before they reach the
        # dispatcher, so what the worker says it runs is true only once this is set again.
        self.settled = asyncio.Event()
        self.settled.set()

    # ------------------------------------------------------------------ wake-ups

    def stop(self) -> None:
        self.wake.set()

    def on_type_notify(self, payload: str) -> None:
        """A type's channel: `payload` is the earliest run_at (epoch seconds) of what was queued."""
        with contextlib.suppress(ValueError):
            delay = float(payload) - self.db_now()
            if delay > 0.001:
                self.schedule_wake(delay)
                return
        self.backlog = True
        self.wake.set()

    def on_finished(self) -> None:
        """Tasks reached a final state on some worker (the finished channel, heard only by workers with
        a per-key limit): one held back by a limit claims again soon instead of at its backed-off timer."""
        if self.w.flow.held:
            self.schedule_wake(FINISHED_COALESCE_SECONDS)

    def on_listen_connect(self) -> None:
        """A (re)connected LISTEN may have missed notifications: claim to catch up."""
        self.backlog = True
        self.wake.set()

    def slot_freed(self, task_type: str) -> None:
        """A running task of `task_type` ended (called by the worker)."""
        if task_type in self.held:
            self.backlog = True
        if self.backlog or not self.w.stopping:
            self.wake.set()

    def room_freed(self) -> None:
        """The completer committed a batch: claims held back by its bound may go on, and a type held
        back by its cluster-wide cap or a per-key limit may have room now (its tasks count as running
        until this commit).

        A burst worker whose last empty claim left only acks to write waits for them before it claims
        again or exits: the commit that writes the last of them wakes it, not the next tick of its
        50 ms wait (most of a short drain's tail, issue 12). Nothing awaits between the completer
        emptying ``unwritten`` and this call, so the fetcher either sees acks still unwritten and
        then waits on an event this sets, or sees none and claims at once."""
        if self.held & self.capped or self.w.flow.held:
            self.backlog = True
        if self.backlog or (self.w.burst and not self.w.completer.unwritten):
            self.wake.set()

    def room(self) -> int:
        """How many more attempts the completer's bound allows (running + unwritten <= bound)."""
        w = self.w
        c = w.completer
        d = w.dispatcher
        return c.bound - len(w._running) - len(d.deferred) - len(d.ahead.waiting) - c.unwritten

    def db_now(self) -> float:
        return time.time() + self.clock_offset

    def wake_at(self, db_epoch: float) -> None:
        """Wake when the database's clock reads `db_epoch` (a run_at the database returned)."""
        self.schedule_wake(max(0.0, db_epoch - self.db_now()))

    def schedule_wake(self, delay: float) -> None:
        """Wake after `delay` seconds, keeping only the earliest timer."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if self._timer is not None and not self._timer.cancelled() and self._timer.when() <= when:
            return
        if self._timer is not None:
            self._timer.cancel()

        def fire() -> None:
            self._timer = None
            self.backlog = True
            self.wake.set()

        self._timer = loop.call_at(when, fire)

    # ------------------------------------------------------------------ claiming

    def free_slots(self) -> dict[str, int]:
        w = self.w
        # Abandoned threads (hard timeouts) still hold their pool slot until they return.
        total = w.concurrency - len(w._running) - len(w._abandoned)
        return {t: max(0, min(total, w.limits[t] - w._running_by_type[t])) for t in w.types}

    async def run(self) -> None:
        """The claim loop, until the worker stops (or, in burst mode, until nothing is runnable)."""
        w = self.w
        idle_claims = 0
        while not w.stopping:
            free = self.free_slots()
            # Beyond the free slots, the tasks the slots would finish during a claim (prefetch.py).
            ahead = w.dispatcher.ahead.room(free, w.limits, self.capped | w.flow.rules.keys())
            want = min(min(sum(free.values()), w.concurrency - len(w._running)) + sum(ahead.values()),
                       self.room())
            if want <= 0 or not self.backlog:
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=w.poll)
                except TimeoutError:
                    self.backlog = True
                self.wake.clear()
                continue
            counts = {t: n + ahead[t] for t, n in free.items()} if any(ahead.values()) else free
            self.settled.clear()
            try:
                rows = await w._db(self._claim, counts, want)
                w._dispatch(rows)
            finally:
                self.settled.set()
            if rows:
                idle_claims = 0
                self._rearms = 0
                # Let a few slots free up before the next claim: one claim per handful of finished
                # tasks instead of one per task (a round trip each), at a cost of <= 1 ms of delay.
                if len(rows) == want:
                    await self._gather_slots()
                continue
            self.backlog = False
            await self._arm_timer(free)
            if w.burst:
                if w._running or w.completer.unwritten or w.dispatcher.ahead.waiting:
                    idle_claims = 0  # what runs now may release dependents or fail into a retry
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), timeout=0.05)
                    self.wake.clear()
                else:
                    await w.completer.flush()
                    idle_claims += 1
                    if idle_claims >= 2:  # two empty claims in a row with nothing running or unwritten
                        return
                self.backlog = True

    async def _gather_slots(self) -> None:
        w = self.w
        target = max(1, w.concurrency // 4)
        deadline = time.monotonic() + 0.001
        while w.concurrency - len(w._running) < target and time.monotonic() < deadline and not w.stopping:
            await asyncio.sleep(0)

    async def _claim(self, conn: Any, free: dict[str, int], want: int) -> list[Any]:
        w = self.w
        started = time.perf_counter()
        rows: list[Any] = []
        if w.flow.rules:  # fair, per-key limited or rate-limited types: runtime/flow.py
            rows = await w.flow.claim(conn, free, want, w.id, w.lease)
            want -= len(rows)
            if w.flow.wake_in is not None:  # a rate window frees a grant then: claim at that moment
                self.schedule_wake(w.flow.wake_in + MIN_REARM_SECONDS)
        types = [t for t in w.types if free[t] > 0 and t not in w.flow.rules]
        counts = [free[t] for t in types]
        capped = sorted(t for t in types if t in self.capped)
        if not types or want <= 0:
            pass  # every type with free slots is flow-controlled, or they took every slot
        elif not capped:  # the common case: one statement, no transaction block (two round trips fewer)
            rows += await conn.fetch(w.q.claim, types, counts, want, w.id, w.lease, capped)
        else:
            async with conn.transaction():
                await conn.fetch(w.q.cap_lock, capped)
                for r in await conn.fetch(w.q.running_count, capped):
                    i = types.index(r["type"])
                    counts[i] = max(0, min(counts[i], r["max_running"] - r["running"]))
                rows += await conn.fetch(w.q.claim, types, counts, want, w.id, w.lease, capped)
        w.stats.claims += 1
        seconds = time.perf_counter() - started
        w.dispatcher.ahead.claimed(seconds)
        metrics.observe_claim(len(rows), seconds)
        return rows

    async def _arm_timer(self, free: dict[str, int]) -> None:
        """After an empty claim: learn the caps and the database's clock, and set a timer for the
        earliest task that this worker could claim."""
        w = self.w
        claimable = [t for t in w.types if free[t] > 0]

        async def ask(conn: Any) -> Any:
            return await conn.fetchrow(w.q.next_wake, w.types, claimable)

        asked_at = time.time()
        row = await w._db(ask)
        self.clock_offset = row["db_now"] - (asked_at + time.time()) / 2
        self.capped = set(row["capped"])
        self.held = {t for t in w.types if free[t] <= 0} | self.capped
        delay = row["delay"]
        if delay is None or delay > 0:
            w.flow.held = False  # nothing runnable waits: a task finishing elsewhere frees nothing for us
        if delay is None:
            return
        if delay <= 0:
            # Runnable but not ours (another worker's claim holds it): try again soon, not at once.
            delay = min(w.poll, MIN_REARM_SECONDS * 2 ** min(self._rearms, 20))
            self._rearms += 1
        else:
            self._rearms = 0
        self.schedule_wake(delay)

