"""Waiting for tasks: ``Client.wait``, ``Client.events`` (and their async twins) on one LISTEN per process.

A waiter never trusts a notification for its answer: it re-reads its tasks (``wait.sql: watch``) and a
notification only says *when* to look again. So a lost notification costs at most one poll, and
waiting works the same without LISTEN at all.

The process keeps one :class:`Hub`: a daemon thread with its own event loop that holds one LISTEN
connection per database and schema (the runtime's reconnecting :class:`~jobqueue.runtime.listener.Listener`)
on ``<schema>.finished`` (the completer and the rescuer) and ``<schema>.progress``, and wakes the
waiters of the ids and documents it hears, sync (a thread's Event) and async (any event loop) alike.
A thousand waiters share that one connection.

Where LISTEN hears nothing (PgBouncer in transaction mode without ``JOBQ_LISTEN_URL``) a probe
notification sent after each connect never arrives; waiters then poll every ``wait_poll_seconds``
(``JOBQ_WAIT_LISTEN=false`` makes them poll from the start).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from jobqueue.db.queries import WaitSQL
from jobqueue.errors import InvalidPayload, TaskFailed, TaskNotFound, WaitTimeout
from jobqueue.settings import Settings
from jobqueue.states import TERMINAL, Status, finished_channel, progress_channel

log = logging.getLogger("jobq.wait")
# A feed nobody waits on keeps its connection this long, so a loop of waits does not reconnect each time.
LINGER_SECONDS = 10.0
# A probe that has not come back by then means LISTEN hears nothing: poll.
PROBE_SECONDS = 2.0
_PROBE_PREFIX = "probe:"


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One watched task as it is now: yielded when its status, progress or newest message changes."""

    task_id: int
    status: Status
    progress: float
    message: str  # the newest line of the task's progress log
    type: str
    doc_id: int | None = None
    error: str | None = None  # the last error (a retry's, or the final one)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


# ---------------------------------------------------------------- what is watched (no I/O)


class Watch:
    """The tasks one waiter follows, what it has seen of them, and when it is over."""

    def __init__(self, task_ids: int | Iterable[int] | None, doc_id: int | None, *, with_result: bool = False) -> None:
        ids = [task_ids] if isinstance(task_ids, int) else list(task_ids or [])
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise InvalidPayload("task_ids must be task ids (integers)")
        if not ids and doc_id is None:
            raise InvalidPayload("give task ids or a doc_id to wait for")
        self.ids = sorted(set(ids))
        self.doc_id = doc_id
        self.with_result = with_result
        self.seen: dict[int, TaskEvent] = {}
        self.results: dict[int, Any] = {}

    def params(self) -> tuple[Any, ...]:
        """wait.sql `watch` ($1..$3)."""
        return (self.ids, self.doc_id, self.with_result)

    def update(self, rows: Iterable[Mapping[str, Any]]) -> list[TaskEvent]:
        """The events in a fresh read of the tasks: those that changed since the last read."""
        changed: list[TaskEvent] = []
        found: set[int] = set()
        for r in rows:
            event = TaskEvent(int(r["id"]), Status(r["status"]), float(r["progress"]), str(r["message"] or ""),
                              str(r["type"]), r["doc_id"], r["last_error"])
            found.add(event.task_id)
            if r["result"] is not None:
                self.results[event.task_id] = json.loads(r["result"])
            if self.seen.get(event.task_id) != event:
                self.seen[event.task_id] = event
                changed.append(event)
        missing = [i for i in self.ids if i not in found]
        if missing:
            raise TaskNotFound(f"no task with id {', '.join(map(str, missing))}")
        return changed

    @property
    def finished(self) -> bool:
        """Every watched task is final (a document without tasks has nothing to wait for)."""
        return all(e.finished for e in self.seen.values())

    def outcome(self, task_id: int) -> Any:
        """The result of a done task, else TaskFailed with its final status and last error."""
        event = self.seen[task_id]
        if event.status is Status.DONE:
            return self.results.get(task_id)
        raise TaskFailed(task_id, event.status.value, event.error)


class Deadline:
    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0):
            raise InvalidPayload(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self, what: str) -> float | None:
        """Seconds left (None: no limit); WaitTimeout once none are."""
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"{what} did not finish within {self.timeout:g}s")
        return left


def describe(watch: Watch) -> str:
    if watch.doc_id is not None and not watch.ids:
        return f"document {watch.doc_id}"
    return "task " + ", ".join(map(str, watch.ids)) if len(watch.ids) < 6 else f"{len(watch.ids)} tasks"


# ---------------------------------------------------------------- the process's listener


class Waker(Protocol):
    def wake(self) -> None: ...


class ThreadWaker:
    """Wakes a sync waiter (Client.wait) blocked in its own thread."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def wake(self) -> None:
        self.event.set()


class LoopWaker:
    """Wakes an async waiter on its own event loop, from the hub's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the waiter's loop is closed: nobody left to wake
            self.loop.call_soon_threadsafe(self.event.set)


class Feed:
    """One LISTEN connection (a database and schema) and the waiters it wakes, by task and document."""

    def __init__(self, hub: Hub, listen_url: str, probe_url: str, schema: str) -> None:
        self.hub = hub
        self.listen_url = listen_url
        self.probe_url = probe_url
        self.schema = schema
        self.by_task: dict[int, set[Waker]] = {}
        self.by_doc: dict[int, set[Waker]] = {}
        self.users = 0
        self.heard = False  # the last probe came back: notifications reach us
        self.listener: Any = None
        self._token = ""
        self._task: asyncio.Task[None] | None = None
        self._probing: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None

    # -- in the hub's thread

    async def start(self) -> None:
        from jobqueue.runtime.listener import Listener

        self.listener = Listener(self.listen_url, [finished_channel(self.schema), progress_channel(self.schema)],
                                 self._notified, self._connected)
        self._task = asyncio.get_running_loop().create_task(self.listener.run())

    async def stop(self) -> None:
        self.heard = False
        if self.listener is not None:
            await self.listener.stop()
        if self._task is not None:
            self._task.cancel()  # it may be sleeping in a reconnect backoff
            await asyncio.gather(self._task, return_exceptions=True)

    def _connected(self) -> None:
        self.heard = False
        self._token = f"{_PROBE_PREFIX}{uuid.uuid4().hex}"
        self._probing = asyncio.get_running_loop().create_task(self._probe(self._token))  # kept: not collected
        self.wake_all()  # anything that finished before LISTEN took effect is read now

    async def _probe(self, token: str) -> None:
        import asyncpg

        try:
            conn = await asyncpg.connect(self.probe_url, statement_cache_size=0, timeout=10)
            try:
                await conn.fetch(WaitSQL.load(self.schema).probe, finished_channel(self.schema), token)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.debug("LISTEN probe not sent: %s", exc)
            return
        await asyncio.sleep(PROBE_SECONDS)
        if not self.heard and token == self._token:
            log.warning("LISTEN on %s hears no notifications (PgBouncer in transaction mode?): waiters poll "
                        "every JOBQ_WAIT_POLL_SECONDS; set JOBQ_LISTEN_URL to a direct connection", self.schema)

    def _notified(self, channel: str, payload: str) -> None:
        if payload.startswith(_PROBE_PREFIX):
            self.heard = self.heard or payload == self._token
            return
        parts = payload.split(",")
        with self.hub.lock:
            if channel.endswith(".progress"):  # <id>,<doc_id>,<progress>
                woken = set(self.by_task.get(_int(parts[0]), ()))
                if len(parts) > 1:
                    woken |= self.by_doc.get(_int(parts[1]), set())
            else:  # finished: <id>,<id>,...
                woken = {w for p in parts for w in self.by_task.get(_int(p), ())}
        for w in woken:
            w.wake()

    def wake_all(self) -> None:
        with self.hub.lock:
            woken = {w for ws in (*self.by_task.values(), *self.by_doc.values()) for w in ws}
        for w in woken:
            w.wake()

    # -- in any thread (under hub.lock)

    def add(self, watch: Watch, waker: Waker) -> None:
        for i in watch.ids:
            self.by_task.setdefault(i, set()).add(waker)
        if watch.doc_id is not None:
            self.by_doc.setdefault(watch.doc_id, set()).add(waker)
        self.users += 1

    def remove(self, watch: Watch, waker: Waker) -> None:
        docs = [] if watch.doc_id is None else [watch.doc_id]
        for table, keys in ((self.by_task, watch.ids), (self.by_doc, docs)):
            for k in keys:
                ws = table.get(k)
                if ws is not None:
                    ws.discard(waker)
                    if not ws:
                        del table[k]
        self.users -= 1

    @property
    def listening(self) -> bool:
        """Notifications reach this feed: waiters may sleep up to the safety poll."""
        return self.heard and self.listener is not None and self.listener.connected.is_set()


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


class Hub:
    """The process's listener: a daemon thread and its event loop, one :class:`Feed` per database and schema."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.feeds: dict[tuple[str, str], Feed] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="jobq-wait-listener", daemon=True).start()
            self._loop = loop
        return self._loop

    def join(self, settings: Settings, url: str, watch: Watch, waker: Waker) -> Feed | None:
        """Register a waiter; None when waiting does not LISTEN (JOBQ_WAIT_LISTEN=false)."""
        if not settings.wait_listen:
            return None
        listen_url = settings.listen_url or url
        key = (listen_url, settings.schema_name)
        with self.lock:
            loop = self._running_loop()
            feed = self.feeds.get(key)
            if feed is None:
                feed = self.feeds[key] = Feed(self, listen_url, url, settings.schema_name)
                asyncio.run_coroutine_threadsafe(feed.start(), loop)
            feed.add(watch, waker)
            if feed._linger is not None:
                loop.call_soon_threadsafe(feed._linger.cancel)
                feed._linger = None
        return feed

    def leave(self, feed: Feed | None, watch: Watch, waker: Waker) -> None:
        if feed is None:
            return
        with self.lock:
            feed.remove(watch, waker)
            if feed.users == 0 and self._loop is not None:
                self._loop.call_soon_threadsafe(self._schedule_close, feed)

    def forget(self, url: str) -> None:
        """Close the feeds on `url` now, whoever waits (a test database about to be dropped)."""
        with self.lock:
            gone = [self.feeds.pop(key) for key in [k for k in self.feeds if k[0] == url]]
            loop = self._loop
        if loop is None or not gone:
            return
        for feed in gone:
            asyncio.run_coroutine_threadsafe(feed.stop(), loop).result(timeout=10)

    def _schedule_close(self, feed: Feed) -> None:
        """In the hub's thread: close an unused feed after LINGER_SECONDS (a new waiter cancels it)."""
        with self.lock:
            if feed.users == 0 and feed._linger is None and self._loop is not None:
                feed._linger = self._loop.call_later(LINGER_SECONDS, self._close, feed)

    def _close(self, feed: Feed) -> None:
        with self.lock:
            if feed.users or self.feeds.get((feed.listen_url, feed.schema)) is not feed:
                return
            del self.feeds[(feed.listen_url, feed.schema)]
        asyncio.get_running_loop().create_task(feed.stop())


_hub = Hub()


def hub() -> Hub:
    return _hub


def _forked() -> None:
    """A forked child has none of its parent's threads: it starts a listener of its own when it waits."""
    global _hub
    _hub = Hub()


os.register_at_fork(after_in_child=_forked)


def interval(feed: Feed | None, settings: Settings) -> float:
    """How long a waiter sleeps without a wake-up: the safety poll while LISTEN works, else the fast poll."""
    return settings.poll_seconds if feed is not None and feed.listening else settings.wait_poll_seconds


def sleep_for(feed: Feed | None, settings: Settings, deadline: Deadline, watch: Watch) -> float:
    left = deadline.remaining(describe(watch))
    step = interval(feed, settings)
    return step if left is None else min(step, left)


def one_task(task_id: int) -> int:
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise InvalidPayload(f"wait takes one task id, got {task_id!r}")
    return task_id


def statements(settings: Settings) -> WaitSQL:
    return WaitSQL.load(settings.schema_name)


__all__ = ["Deadline", "Hub", "LoopWaker", "TaskEvent", "ThreadWaker", "Watch", "hub", "one_task", "sleep_for",
           "statements"]
