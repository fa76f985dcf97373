"""Group commit: concurrent ``enqueue()`` calls of one client share one statement and one commit.

A web server that enqueues a task per request makes many small calls at once; one durable commit
per call caps it at the disk's flushes per second (issue 12, target 4). Here, while one enqueue
statement is in flight, further calls of the same client wait in a queue; when it returns, the next
statement carries every waiting call (client.sql ``enqueue_many``: one multi-row insert, one commit)
and each caller gets its own id or its own error. A call that finds nothing in flight goes at once,
alone, through the single-row ``enqueue`` statement exactly as without grouping: grouping only ever
replaces *waiting* by *sharing*, so it adds no latency and is on by default.

What is never grouped (the client sends it itself, as before):

* a call given the caller's ``connection``: it belongs to the caller's transaction;
* a call with ``depends_on``: it locks its parents and inserts in one transaction of its own.

Each call's result is the one a lone call would get. Everything a caller can get wrong is checked
before it joins the queue (unknown type, malformed payload), so it fails alone. A dedupe key taken
by a live task, or by an earlier call in the same statement, gives that task's id, as a lone call
waiting for the other's commit would; rows are sent in dedupe-key order so two groups inserting the
same keys cannot deadlock. When the server refuses the shared statement (a missing ``doc_id``, a
constraint, a trigger), nothing of it was written and every call of it is re-run alone, so only the
calls at fault fail. When the connection is lost, every call of the statement gets the error: as
for a lone call, the commit may or may not have happened, and no call is silently re-sent.

The sync client's callers are threads: a lone call runs on its own thread's connection; calls that
wait are sent by one event-loop thread on asyncpg (jobqueue/client/loopthread.py) while their threads
sleep until their result is in. Sixteen threads sending their own groups on psycopg spent most of
their time under the GIL in the driver and in handing the lead on (docs/benchmarks.md).
The async client's callers are coroutines: a lone call runs in its caller (cancelling it cancels its
statement, as before); waiting calls are sent by a background task, so a caller cancelled while its
call waits is dropped from the queue (nothing written), and one cancelled after its statement was
sent leaves the row to commit with the others (a lone call cancelled that late may commit too).
"""

from __future__ import annotations

import asyncio
import threading
from _thread import LockType
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobqueue.client import encode
from jobqueue.client.encode import NO_DEPENDENCIES, TaskRow
from jobqueue.errors import DatabaseError, DatabaseUnavailable, JobqError

# The most calls one statement carries (a queue longer than that is sent in several statements, one
# after the other): bounds the statement's size and the lock a batch of dedupe keys holds.
MAX_BATCH = 500


@dataclass(slots=True)
class Call:
    """One waiting ``enqueue()``: its validated row and labels, then its id or its error."""

    row: TaskRow
    labels: list[str] | None
    id: int | None = None
    error: BaseException | None = None

    def settled(self) -> bool:
        return self.id is not None or self.error is not None

    def result(self) -> int:
        if self.error is not None:
            raise self.error
        assert self.id is not None, "a group call returned unsettled"
        return self.id


@dataclass(slots=True)
class GroupStats:
    """What grouping did in this client: ``calls`` sent through the group path, in ``statements``
    (a lone call is one statement of one call), ``largest`` the most calls one statement carried."""

    calls: int = 0
    statements: int = 0
    largest: int = 0
    # The sync client counts from its callers' threads and its loop thread at once.
    _lock: LockType = field(default_factory=threading.Lock, repr=False, compare=False)

    def sent(self, calls: int) -> None:
        """One statement for `calls` calls (a call re-run alone is a statement of its own)."""
        with self._lock:
            self.statements += 1
            self.largest = max(self.largest, calls)


# ---------------------------------------------------------------- statements


def lone_params(call: Call) -> tuple[Any, ...]:
    """client.sql ``enqueue`` for a call that goes alone (nothing else waiting, or re-run alone)."""
    return encode.enqueue_params(call.row, call.labels, None, NO_DEPENDENCIES)


def in_key_order(calls: Sequence[Call]) -> list[Call]:
    """The calls in dedupe-key order (rows without a key first, in arrival order): every statement
    takes the keys' index entries in one order, so two concurrent groups cannot deadlock."""
    return sorted(calls, key=lambda c: (c.row.dedupe_key is not None, c.row.dedupe_key or ""))


def labels_json(calls: Sequence[Call]) -> list[str | None]:
    """Each call's labels for client.sql ``enqueue_many``."""
    return [encode.labels_json(c.labels) for c in calls]


def take(calls: Sequence[Call], ids: Sequence[int | None]) -> None:
    """Give each call its id from the runs of ``enqueue_many`` that committed (None: not yet)."""
    for call, i in zip(calls, ids, strict=True):
        if i is not None:
            call.id = i


def alone_after(calls: Sequence[Call], exc: JobqError) -> list[Call]:
    """The calls to re-run one by one after the shared statement failed with `exc`, settling the others.

    The server refused it (a constraint, a trigger, a missing document): the statement rolled back
    and wrote nothing, so each unsettled call is re-run alone and only the calls at fault fail. The
    connection went away (:class:`DatabaseUnavailable`): the commit may have happened, so no call is
    re-sent; each gets the error, as a lone call would.
    """
    todo = [c for c in calls if not c.settled()]
    if len(calls) > 1 and not isinstance(exc, DatabaseUnavailable):
        return todo
    _fail(todo, exc)
    return []


def lost_race(row: TaskRow) -> DatabaseError:
    """A call whose dedupe key kept racing (RACE_RETRIES runs), grouped or alone."""
    return DatabaseError(f"enqueue of {row.type!r} kept losing a dedupe race on {row.dedupe_key!r}")


def lost_races(calls: Iterable[Call]) -> None:
    """The calls of a shared statement still without an id after its runs: each gets a lone call's error."""
    for c in calls:
        if not c.settled():
            c.error = lost_race(c.row)


# ---------------------------------------------------------------- threads (the sync client)


@dataclass(slots=True, eq=False)
class _Waiter:
    """A thread's call in the queue; `wake` is held until the call is settled (a bare lock: one futex
    to wake its thread, where an Event takes a condition and a loop)."""

    call: Call
    wake: LockType


@dataclass(eq=False)
class ThreadGroup:
    """A call that finds nothing in flight runs at once on its own thread's connection; calls that
    arrive meanwhile queue, and one event-loop thread (jobqueue/client/loopthread.py) sends them all
    in each statement until none is left, while their threads sleep."""

    stats: GroupStats = field(default_factory=GroupStats)
    _lock: LockType = field(default_factory=threading.Lock)
    _queue: list[_Waiter] = field(default_factory=list)
    _alone: bool = False  # a call is running on its caller's connection
    _flushing: bool = False  # the loop thread is sending the queue

    def waiting(self) -> int:
        """Calls queued behind the statement in flight."""
        return len(self._queue)

    def submit(self, call: Call, alone: Callable[[Call], None], flush_soon: Callable[[], None]) -> int:
        """Run `call` and return its id: `alone` runs a call by itself on the calling thread's
        connection; `flush_soon` has the loop thread run :meth:`flush` (asked for when a lone call
        returns with calls queued behind it)."""
        with self._lock:
            self.stats.calls += 1
            go_alone = not (self._alone or self._flushing)
            if go_alone:
                self._alone = True
            else:
                me = _Waiter(call, threading.Lock())
                me.wake.acquire()
                self._queue.append(me)
        if not go_alone:
            me.wake.acquire()  # released once the loop thread settled this call
            return call.result()
        try:
            alone(call)
        finally:
            with self._lock:  # the calls that queued meanwhile go next, in one statement
                self._alone = False
                self._flushing = kick = bool(self._queue)
            if kick:
                try:
                    flush_soon()
                except Exception as exc:  # no loop thread (none could start): the waiting calls fail
                    self._abandon(exc)  # with the reason; this call's own result stands
                except BaseException as exc:
                    self._abandon(exc)
                    raise
        return call.result()

    async def flush(self, send: Callable[[list[Call]], Awaitable[None]]) -> None:
        """On the loop thread: send the queue, every waiting call (up to MAX_BATCH) a statement."""
        try:
            while True:
                with self._lock:
                    batch = self._queue[:MAX_BATCH]
                    del self._queue[:MAX_BATCH]
                    if not batch:
                        self._flushing = False
                        return
                calls = [w.call for w in batch]
                try:
                    await send(calls)
                except Exception as exc:  # a bug: each caller raises it, the queue goes on
                    _fail(calls, exc)
                finally:
                    if not all(c.settled() for c in calls):  # the send was interrupted
                        _fail(calls, _interrupted())
                    for w in batch:
                        w.wake.release()
        except BaseException as exc:  # the loop is going away: nobody must sleep forever
            self._abandon(exc)
            raise

    def _abandon(self, exc: BaseException) -> None:
        """Fail every queued call (their statement will never be sent) and wake their threads."""
        with self._lock:
            batch, self._queue = self._queue, []
            self._flushing = False
        if not isinstance(exc, Exception):
            exc = JobqError(f"enqueue not sent: the client's loop thread stopped ({type(exc).__name__}); "
                            "nothing of it was written")
        _fail([w.call for w in batch], exc)
        for w in batch:
            w.wake.release()


def _interrupted() -> DatabaseUnavailable:
    return DatabaseUnavailable("enqueue interrupted while its statement was being sent; "
                               "the task may or may not have been committed")


# ---------------------------------------------------------------- coroutines (the async client)


@dataclass(eq=False)
class LoopGroup:
    """A lone call runs in its caller; calls that arrive while a statement is in flight wait for
    a background task that sends them all in the next one, until none is left."""

    stats: GroupStats = field(default_factory=GroupStats)
    _queue: list[tuple[Call, asyncio.Future[None]]] = field(default_factory=list)
    _busy: bool = False
    _flusher: asyncio.Task[None] | None = None

    def waiting(self) -> int:
        """Calls queued behind the statement in flight."""
        return len(self._queue)

    async def submit(self, call: Call, send: Callable[[list[Call]], Awaitable[None]]) -> int:
        self.stats.calls += 1
        if not self._busy:
            self._busy = True
            try:
                await send([call])
            finally:
                self._next(send)
            return call.result()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((call, done))
        await done  # a cancelled caller cancels `done`: the flusher skips its call if not yet sent
        return call.result()

    def _next(self, send: Callable[[list[Call]], Awaitable[None]]) -> None:
        if self._queue:
            self._flusher = asyncio.get_running_loop().create_task(self._flush(send))
        else:
            self._busy = False

    async def _flush(self, send: Callable[[list[Call]], Awaitable[None]]) -> None:
        try:
            while self._queue:
                taken = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                batch = [(c, f) for c, f in taken if not f.done()]
                if not batch:
                    continue
                calls = [c for c, _ in batch]
                try:
                    await send(calls)
                except Exception as exc:  # a bug: each caller raises it, the queue goes on
                    _fail(calls, exc)
                except BaseException:
                    _fail(calls, asyncio.CancelledError())
                    raise
                finally:
                    for _, f in batch:
                        if not f.done():
                            f.set_result(None)
        finally:
            for _, f in self._queue:  # only left when the flusher itself was cancelled (loop shutting down)
                f.cancel()
            self._queue.clear()
            self._flusher = None
            self._busy = False

    async def idle(self) -> None:
        """Wait until every queued call was sent (before the client closes its pool)."""
        while self._flusher is not None:
            await asyncio.wait({self._flusher})


def _fail(calls: Iterable[Call], exc: BaseException) -> None:
    for c in calls:
        if not c.settled():
            c.error = exc
