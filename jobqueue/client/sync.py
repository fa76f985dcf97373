"""The producer API: enqueue (one, many, with dependencies), get, list, cancel, retry.

Sync on psycopg, async on asyncpg. Given the caller's own connection (psycopg, asyncpg, or a
SQLAlchemy Connection/Session on either driver) every write happens in the caller's transaction:
the task exists, and wakes workers, only when the caller commits (NOTIFY is transactional).
Everything a user can get wrong is checked before the first write, so a bad call writes nothing.
"""

from __future__ import annotations

import builtins
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.pq import TransactionStatus

from jobqueue.client import encode, fields, group, loopthread
from jobqueue.client import wait as waits
from jobqueue.client.base import (
    RACE_RETRIES,
    ClientBase,
    all_ids,
    id_statuses,
    not_prioritized,
    not_retryable,
    status_of,
)
from jobqueue.client.encode import LIVE
from jobqueue.client.wait import TaskEvent
from jobqueue.db.connect import connect
from jobqueue.db.errors import translate
from jobqueue.db.fetch import Row, fetch
from jobqueue.errors import JobqError, TaskNotFound
from jobqueue.models import QueueState, Task, TaskSpec
from jobqueue.settings import Settings

if TYPE_CHECKING:
    from jobqueue.client.aio import AsyncClient

# ---------------------------------------------------------------- connections

# Forks of this process so far, counted in the child (no system call per enqueue to notice one); and
# what a forked child inherited from its parent and must never finalise or send on (the parent's sockets).
_forks = 0
_inherited: list[object] = []


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


def psycopg_connection(conn: Any) -> psycopg.Connection[Any] | None:
    """The psycopg connection behind a psycopg / SQLAlchemy Connection / Session, else None."""
    if isinstance(conn, psycopg.Connection):
        return conn
    try:
        from sqlalchemy.engine import Connection as SAConnection
        from sqlalchemy.orm import Session
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        return None
    if isinstance(conn, Session):
        conn = conn.connection()
    if isinstance(conn, SAConnection):
        raw = conn.connection.driver_connection
        if isinstance(raw, psycopg.Connection):
            return raw
        raise JobqError("SQLAlchemy connections must use the psycopg driver (postgresql+psycopg://)")
    return None


class Client(ClientBase):
    """Sync producer on psycopg. One connection per thread, reused between calls.

    ``group_commit`` (default on): ``enqueue()`` calls made by several threads at once share one
    statement and one commit (jobqueue/client/group.py). It is on by default because it cannot be
    seen: each call still returns its own id, once its task is committed, or raises its own error,
    and a call that finds no other in flight goes at once, alone, as it would without grouping.
    The calls that wait are sent by a thread of the client's own, on asyncpg (started at the first
    call that waits; ``close()`` stops it). Off, each call is its own commit, so concurrent callers
    queue on the disk's flushes instead.
    """

    def __init__(self, url: str | None = None, *, settings: Settings | None = None,
                 group_commit: bool = True) -> None:
        super().__init__(url, settings=settings)
        self._local = threading.local()
        self._group = group.ThreadGroup() if group_commit else None
        self._loop = loopthread.LoopThread("jobq-enqueue")
        self._sender: AsyncClient | None = None  # on the loop thread, for the calls that wait
        self._forks = _forks

    @property
    def group_stats(self) -> group.GroupStats | None:
        """How many enqueue() calls went through group commit, in how many statements (None: off)."""
        return None if self._group is None else self._group.stats

    def _own(self) -> psycopg.Connection[Any]:
        self._check_fork()
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = connect(self.url, autocommit=True)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection, and the loop thread's pool once its waiting calls are sent."""
        self._check_fork()  # a forked child closing the parent's connection would end the parent's session
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._sender is not None:
            self._loop.close(self._close_sender)

    async def _close_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            await sender.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _using(self, connection: Any) -> Iterator[psycopg.Connection[Any]]:
        """The caller's connection or our own; every driver error leaves as a JobqError.

        Our own connection is in autocommit: one statement is its own transaction (no BEGIN/COMMIT
        round trips); calls of several statements open one with :func:`_atomic`. A broken own
        connection is dropped so the next call reconnects.
        """
        if connection is None:
            conn = self._own()
        else:
            found = psycopg_connection(connection)
            if found is None:
                raise JobqError(f"unsupported connection type {type(connection).__name__} for the sync API")
            conn = found
        try:
            yield conn
        except (psycopg.Error, OSError) as exc:
            if connection is None and conn.broken:
                self.close()
            raise translate(exc) from None

    def _fetch(self, conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> builtins.list[Row]:
        return fetch(conn, sql, params)

    # -- enqueue

    def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        max_retries: int | None = None,
        dedupe_key: str | None = None,
        doc_id: int | None = None,
        batch_id: int | None = None,
        from_page: int | None = None,
        to_page: int | None = None,
        owner: str | None = None,
        labels: Sequence[str] | None = None,
        digest: str | None = None,
        depends_on: Sequence[int] | None = None,
        run_on: str | None = None,
        connection: Any = None,
    ) -> int:
        """Enqueue one task and return its id (the live task's id when `dedupe_key` collides).

        With ``depends_on``, ``run_on`` says when it runs: ``"success"`` (every parent done, the
        default), ``"always"`` or ``"failure"`` (a callback; see jobqueue.states.RunOn).
        """
        spec = TaskSpec(payload, priority, run_at, delay, max_retries, dedupe_key, doc_id, batch_id,
                        from_page, to_page, owner, digest)
        row = encode.row(type, spec, self.settings)
        lab = encode.labels(labels)
        deps = encode.dependencies(depends_on)
        when = encode.run_on(run_on, deps)
        if self._group is not None and connection is None and not deps:
            return self._grouped(group.Call(row, lab))
        with self._using(connection) as conn, (_atomic(conn) if deps else nullcontext()):
            plan = encode.NO_DEPENDENCIES
            if deps:
                plan = encode.plan_dependencies(self._fetch(conn, self.q.lock_parents, (deps,)), deps, when)
            return self._enqueue_one(conn, encode.enqueue_params(row, lab, deps, plan, when), row)

    def _enqueue_one(self, conn: psycopg.Connection[Any], params: tuple[Any, ...], row: encode.TaskRow) -> int:
        for _ in range(RACE_RETRIES):
            rows = self._fetch(conn, self.q.enqueue, params)
            if rows:  # empty: the live duplicate finished between the conflict and the look-up
                return int(rows[0]["id"])
        raise group.lost_race(row)

    def _grouped(self, call: group.Call) -> int:
        self._check_fork()
        assert self._group is not None
        return self._group.submit(call, self._send_alone, self._flush_soon)

    def _send_alone(self, call: group.Call) -> None:
        """A call that found nothing in flight, on its own thread's connection; settles it."""
        assert self._group is not None
        self._group.stats.sent(1)
        try:
            with self._using(None) as conn:
                call.id = self._enqueue_one(conn, group.lone_params(call), call.row)
        except JobqError as exc:
            call.error = exc

    def _flush_soon(self) -> None:
        """Have the loop thread send the waiting calls (on asyncpg: jobqueue/client/loopthread.py)."""
        if self._sender is None:
            from jobqueue.client.aio import AsyncClient

            self._sender = AsyncClient(self.url, settings=self.settings, group_commit=False)
        self._loop.start_soon(self._flush)

    async def _flush(self) -> None:
        sender, grouped = self._sender, self._group
        assert sender is not None and grouped is not None
        await grouped.flush(lambda calls: sender._send_calls(calls, grouped.stats))

    def _check_fork(self) -> None:
        if self._forks != _forks:
            self._forked()

    def _forked(self) -> None:
        """In a forked child: connections, a group and a pool of its own. The parent's stay untouched:
        a child that sent on the parent's sockets would mix two sessions' messages, and one that closed
        them would end the parent's sessions. The parent's loop thread does not exist here."""
        _inherited.extend((self._local, self._sender, self._loop))
        self._local = threading.local()
        self._sender = None
        self._loop = loopthread.LoopThread("jobq-enqueue")
        if self._group is not None:
            self._group = group.ThreadGroup()
        self._forks = _forks

    def _insert_many(self, conn: psycopg.Connection[Any], rows: Sequence[encode.TaskRow],
                     labels: Sequence[str | None], ids: builtins.list[int | None]) -> None:
        """Fill `ids` by client.sql `enqueue_many`, re-run for the rows that lost a dedupe race (left None
        after RACE_RETRIES runs). In place: outside a transaction each run commits, and a caller that
        catches an error must know which rows already have."""
        todo = builtins.list(range(len(rows)))
        for _ in range(RACE_RETRIES):
            found = self._fetch(conn, self.q.enqueue_many,
                                encode.enqueue_many_params([rows[i] for i in todo], [labels[i] for i in todo]))
            todo = encode.merge_batch_ids(ids, todo, found)
            if not todo:
                return

    def enqueue_many(
        self,
        type: str,
        items: Iterable[Any],
        *,
        labels: Sequence[str] | None = None,
        connection: Any = None,
    ) -> builtins.list[int]:
        """Enqueue many tasks of one type in one transaction and return their ids in order.

        Items are payloads or :class:`TaskSpec`. Batches without dedupe keys go through COPY: one
        statement, atomic without BEGIN/COMMIT (the ids reserved before it are only sequence values).
        """
        items = builtins.list(items)
        lab = encode.labels(labels)
        if encode.bare_batch(items, lab):
            return self._copy_bare(type, items, connection)
        rows = encode.rows_for(type, items, self.settings)
        if not rows:
            return []
        with self._using(connection) as conn:
            if encode.has_dedupe_keys(rows):
                ids: builtins.list[int | None] = [None] * len(rows)
                with _atomic(conn):
                    self._insert_many(conn, rows, [encode.labels_json(lab)] * len(rows), ids)
                return all_ids(ids, type)
            new: builtins.list[int] = self._fetch(conn, self.q.reserve_ids, (len(rows),))[0]["ids"]
            with conn.cursor() as cur, cur.copy(self.q.copy_tasks if lab else self.q.copy_tasks_unlabelled) as copy:
                for record in encode.copy_records(new, rows, lab):
                    copy.write_row(record)
            return new

    def _copy_bare(self, type: str, items: builtins.list[Any], connection: Any) -> builtins.list[int]:
        """A batch of payloads by one COPY of BARE_COLUMNS, sent a chunk at a time.

        On our own connection the COPY is its own transaction, so each chunk is validated as it is
        sent: a bad payload aborts the COPY and nothing is written, while the server parses one chunk
        as the next is made. A caller's transaction would be aborted with it, so there every payload
        is validated (and encoded) before the COPY starts.
        """
        with self._using(connection) as conn:
            bare = encode.BareCopy(type, self.settings, conn.info.encoding)
            if not items:
                return []
            payloads = None if connection is None else bare.payloads(items)
            ids: builtins.list[int] = self._fetch(conn, self.q.reserve_ids, (len(items),))[0]["ids"]
            parts = encode.chunks(len(items))
            # Made as sent on our own connection; made whole (any encoding error raised) before it on a caller's.
            data: Iterable[bytes] = (
                (bare.lines(ids[p], bare.payloads(items[p])) for p in parts) if payloads is None
                else [bare.lines(ids[p], payloads[p]) for p in parts])
            with conn.cursor() as cur, cur.copy(self.q.copy_tasks_bare) as copy:
                for chunk in data:
                    copy.write(chunk)
            return ids

    # -- read

    def get(self, task_id: int, *, connection: Any = None) -> Task:
        with self._using(connection) as conn:
            rows = self._fetch(conn, self.q.get, (task_id,))
        if not rows:
            raise TaskNotFound(f"no task with id {task_id}")
        return Task.model_validate(rows[0])

    def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        type: str | Sequence[str] | None = None,
        owner: str | None = None,
        doc_id: int | None = None,
        label: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
        error: str | None = None,
        connection: Any = None,
    ) -> builtins.list[Task]:
        """Newest first, filtered; every filter is optional. Pass the last id seen as `before_id` for the
        next page (keyset pagination: stable while tasks are added, no OFFSET scan). `error` finds text in
        the last error (case-insensitive)."""
        params = fields.list_params(status, type, owner, doc_id, label, before_id, limit, error)
        with self._using(connection) as conn:
            return [Task.model_validate(r) for r in self._fetch(conn, self.q.list, params)]

    # -- control

    def cancel(self, task_id: int | Sequence[int] | None = None, *, doc_id: int | None = None,
               reason: str = "Task stopped by user.", connection: Any = None) -> dict[int, str]:
        """Cancel tasks by id and/or document. Returns {id: status}: ``cancelled`` for tasks stopped at
        once, ``running`` for tasks whose worker was told (they end ``cancelled`` shortly), and the
        current status of named tasks that were already finished."""
        ids = encode.cancel_ids(task_id)
        with self._using(connection) as conn:
            # one statement: atomic without BEGIN/COMMIT
            result = id_statuses(self._fetch(conn, self.q.cancel, encode.cancel_params(ids, doc_id, reason,
                                                                                          self.settings)))
            for i in ids:
                if i not in result:
                    result[i] = status_of(i, self._row(conn, i))
        return result

    def retry(self, task_id: int | None = None, *, doc_id: int | None = None,
              connection: Any = None) -> dict[int, str]:
        """Send a failed or cancelled task (or every such task of a document) back to the queue for a
        fresh set of retries. Returns {id: status}: ``queued``, or ``waiting`` for a task whose parents
        are not all done (a document's follow-up task waits for its retried ranges)."""
        ids = encode.retry_ids(task_id, doc_id)
        with self._using(connection) as conn:
            result = id_statuses(self._fetch(conn, self.q.retry, encode.retry_params(ids, doc_id, self.settings)))
            if task_id is not None and task_id not in result:
                raise not_retryable(task_id, self._row(conn, task_id), doc_id)
        if not result:
            raise not_retryable(None, None, doc_id)
        return result

    # -- control by selector (one statement each; a producer's selector matches only its role's tasks)

    def cancel_where(self, *, type: str | None = None, owner: str | None = None, batch_id: int | None = None,
                     label: str | None = None, doc_id: int | None = None, status: str | Sequence[str] | None = None,
                     reason: str = "Task stopped by user.", connection: Any = None) -> dict[int, str]:
        """Cancel every live task the filters match (at least one filter; `status` among waiting, queued,
        running). Returns {id: status} as :meth:`cancel` does; empty when nothing matched."""
        sel = encode.required("cancel", encode.selector("cancel", encode.CANCELLABLE, type, owner, batch_id,
                                                        label, doc_id, status))
        with self._using(connection) as conn:
            return id_statuses(self._fetch(conn, self.q.cancel_where,
                                           encode.cancel_where_params(sel, reason, self.settings)))

    def retry_where(self, *, type: str | None = None, owner: str | None = None, batch_id: int | None = None,
                    label: str | None = None, doc_id: int | None = None, status: str | Sequence[str] | None = None,
                    connection: Any = None) -> dict[int, str]:
        """Retry every failed or cancelled task the filters match; {id: status} as :meth:`retry`, empty when
        nothing matched."""
        sel = encode.required("retry", encode.selector("retry", encode.RETRYABLE, type, owner, batch_id, label,
                                                       doc_id, status))
        with self._using(connection) as conn:
            return id_statuses(self._fetch(conn, self.q.retry_where, encode.retry_where_params(sel, self.settings)))

    def prioritize(self, task_id: int | Sequence[int] | None = None, *, priority: int, type: str | None = None,
                   owner: str | None = None, batch_id: int | None = None, label: str | None = None,
                   doc_id: int | None = None, status: str | Sequence[str] | None = None,
                   connection: Any = None) -> builtins.list[int]:
        """Give queued and waiting tasks (by id and/or filters) a new priority; the next claim orders by it.
        Returns the ids changed. A task named by id that could not be changed raises why."""
        ids = encode.cancel_ids(task_id)
        sel = encode.selector("prioritize", encode.REPRIORITISABLE, type, owner, batch_id, label, doc_id, status)
        params = encode.prioritize_params(ids, sel, priority)
        with self._using(connection) as conn:
            changed = sorted(int(r["id"]) for r in self._fetch(conn, self.q.prioritize, params))
            for i in ids:
                if i not in changed and sel.is_empty():
                    raise not_prioritized(i, self._row(conn, i))
        return changed

    # -- queue control (writes the queues table: the schema owner may, the jobq_* roles may not)

    def pause(self, type: str, *, connection: Any = None) -> None:
        """Stop claiming `type` from the next claim on; its running tasks carry on."""
        self._set_queue(encode.queue_params(type, paused=True), connection)

    def resume(self, type: str, *, connection: Any = None) -> None:
        """Claim `type` again (its workers are woken at once)."""
        self._set_queue(encode.queue_params(type, paused=False), connection)

    def cap(self, type: str, max_running: int, *, connection: Any = None) -> None:
        """At most `max_running` tasks of `type` running across all workers."""
        self._set_queue(encode.queue_params(type, max_running=max_running), connection)

    def uncap(self, type: str, *, connection: Any = None) -> None:
        self._set_queue(encode.queue_params(type, uncap=True), connection)

    def queues(self, *, connection: Any = None) -> builtins.list[QueueState]:
        """Every type known anywhere (queues table, live tasks, live workers) with its pause, cap, counts
        and the live workers serving it."""
        with self._using(connection) as conn:
            return [QueueState.model_validate(r) for r in self._fetch(conn, self.q.queues, ())]

    def _set_queue(self, params: tuple[Any, ...], connection: Any) -> None:
        with self._using(connection) as conn:
            self._fetch(conn, self.q.set_queue, params)

    def _row(self, conn: psycopg.Connection[Any], task_id: int) -> Row | None:
        rows = self._fetch(conn, self.q.get, (task_id,))
        return rows[0] if rows else None

    # -- waiting (jobqueue/client/wait.py)

    def wait(self, task_id: int, *, timeout: float | None = None) -> Any:
        """Block until the task is final and return its result; :class:`TaskFailed` (with its final status
        and last error) when it failed or was cancelled, :class:`WaitTimeout` after `timeout` seconds."""
        watch = waits.Watch(waits.one_task(task_id), None, with_result=True)
        for _ in self._follow(watch, timeout):
            pass
        return watch.outcome(task_id)

    def events(self, task_ids: int | Iterable[int] | None = None, *, doc_id: int | None = None,
               timeout: float | None = None) -> Iterator[TaskEvent]:
        """The tasks' progress and state changes (each task's current state first), until all are final."""
        return self._follow(waits.Watch(task_ids, doc_id), timeout)

    def _follow(self, watch: waits.Watch, timeout: float | None) -> Iterator[TaskEvent]:
        deadline = waits.Deadline(timeout)
        waker = waits.ThreadWaker()
        feed = waits.hub().join(self.settings, self.url, watch, waker)
        try:
            while True:
                waker.event.clear()  # before the read: a wake-up during it is not lost
                with self._using(None) as conn:
                    rows = self._fetch(conn, waits.statements(self.settings).watch, watch.params())
                yield from watch.update(rows)
                if watch.finished:
                    return
                waker.event.wait(waits.sleep_for(feed, self.settings, deadline, watch))
        finally:
            waits.hub().leave(feed, watch, waker)


def _atomic(conn: psycopg.Connection[Any]) -> AbstractContextManager[Any]:
    """A transaction around several statements when the connection is not in one already.

    An autocommit connection outside a transaction (ours, or a caller's) would commit each statement
    alone: locking a parent and inserting its child must commit together, or the parent can finish
    in between and the child wait forever (issue 11, item 13). Inside the caller's transaction, or
    on a connection that opens one implicitly, the statements already share it.
    """
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        return conn.transaction()
    return nullcontext()

# ---------------------------------------------------------------- module-level convenience

_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def enqueue(type: str, payload: Any = None, **kwargs: Any) -> int:
    """Enqueue one task with the default client; see :meth:`Client.enqueue`."""
    return default_client().enqueue(type, payload, **kwargs)


def enqueue_many(type: str, items: Iterable[Any], **kwargs: Any) -> list[int]:
    return default_client().enqueue_many(type, items, **kwargs)


def get(task_id: int, **kwargs: Any) -> Task:
    return default_client().get(task_id, **kwargs)


def list_tasks(**kwargs: Any) -> list[Task]:
    return default_client().list(**kwargs)


def cancel(task_id: int | Sequence[int] | None = None, **kwargs: Any) -> dict[int, str]:
    return default_client().cancel(task_id, **kwargs)


def retry(task_id: int | None = None, **kwargs: Any) -> dict[int, str]:
    return default_client().retry(task_id, **kwargs)


__all__ = ["LIVE", "Client", "TaskSpec", "cancel", "enqueue", "enqueue_many", "get", "list_tasks", "retry"]
