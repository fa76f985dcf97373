"""The async producer API on asyncpg; same rules as :mod:`jobqueue.client.sync`.

Pass the caller's asyncpg connection (or a SQLAlchemy AsyncConnection/AsyncSession on the asyncpg
driver) to enqueue inside the caller's transaction.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from jobqueue.client import encode, fields, group
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
from jobqueue.client.wait import TaskEvent
from jobqueue.db.asyncpg_errors import DRIVER_ERRORS
from jobqueue.db.connect import first_line, redact
from jobqueue.db.errors import translate
from jobqueue.errors import DatabaseUnavailable, JobqError, TaskNotFound
from jobqueue.models import QueueState, Task, TaskSpec
from jobqueue.settings import Settings

AnyConnection = Any  # asyncpg.Connection or a pool's proxy of one
# Rows of a bare batch whose payloads are made while the ids' statement runs (~2.5 us of client work a
# row against a round trip of ~0.7 ms on this machine); the others are made as the COPY sends them.
EARLY_ROWS = 256
JSONB_COLUMNS = ("payload", "result")  # the tasks table's jsonb columns (migrations/versions/0001_tasks.py)


async def asyncpg_connection(conn: Any) -> AnyConnection | None:
    if isinstance(conn, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy):
        return conn
    try:
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    except ImportError:  # pragma: no cover
        return None
    if isinstance(conn, AsyncSession):
        conn = await conn.connection()
    if isinstance(conn, AsyncConnection):
        raw = (await conn.get_raw_connection()).driver_connection
        if isinstance(raw, asyncpg.Connection):
            return raw
        raise JobqError("SQLAlchemy async connections must use the asyncpg driver (postgresql+asyncpg://)")
    return None


class AsyncClient(ClientBase):
    """Async producer: a small asyncpg pool of its own, or the caller's connection.

    The same methods, arguments, results and errors as :class:`jobqueue.Client`; ``group_commit``
    as there: concurrent ``enqueue()`` calls (coroutines of one event loop) share one statement
    and one commit, a lone call goes at once.
    """

    def __init__(self, url: str | None = None, *, settings: Settings | None = None,
                 group_commit: bool = True) -> None:
        super().__init__(url, settings=settings)
        self._pool: asyncpg.Pool | None = None
        self._group = group.LoopGroup() if group_commit else None

    @property
    def group_stats(self) -> group.GroupStats | None:
        """As :attr:`jobqueue.Client.group_stats`."""
        return None if self._group is None else self._group.stats

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            url = self.url
            try:
                self._pool = await asyncpg.create_pool(url, min_size=1, max_size=4, reset=_session_unchanged)
            except DRIVER_ERRORS as exc:
                raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {first_line(exc)}") from None
        return self._pool

    async def close(self) -> None:
        if self._group is not None:
            await self._group.idle()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _using(self, connection: Any) -> AsyncIterator[AnyConnection]:
        """The caller's connection or one of our pool's; every driver error leaves as a JobqError."""
        try:
            if connection is not None:
                conn = await asyncpg_connection(connection)
                if conn is None:
                    raise JobqError(f"unsupported connection type {type(connection).__name__} for the async API")
                yield conn
                return
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                yield conn
        except DRIVER_ERRORS as exc:
            raise translate(exc) from None

    async def _fetch(self, conn: AnyConnection, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        return [dict(r) for r in await conn.fetch(sql, *params)]

    async def enqueue(
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
            return await self._group.submit(group.Call(row, lab), self._send_group)
        async with self._using(connection) as conn, (_atomic(conn) if deps else nullcontext()):
            plan = encode.NO_DEPENDENCIES
            if deps:
                plan = encode.plan_dependencies(await self._fetch(conn, self.q.lock_parents, (deps,)), deps, when)
            return await self._enqueue_one(conn, encode.enqueue_params(row, lab, deps, plan, when), row)

    async def _enqueue_one(self, conn: AnyConnection, params: tuple[Any, ...], row: encode.TaskRow) -> int:
        for _ in range(RACE_RETRIES):
            rows = await self._fetch(conn, self.q.enqueue, params)
            if rows:  # empty: the live duplicate finished between the conflict and the look-up
                return int(rows[0]["id"])
        raise group.lost_race(row)

    async def _send_group(self, calls: list[group.Call]) -> None:
        if self._group is not None:
            await self._send_calls(calls, self._group.stats)

    async def _send_calls(self, calls: list[group.Call], stats: group.GroupStats) -> None:
        """One statement for waiting ``enqueue()`` calls, on a connection of the pool; settles each
        call. Also where the sync client's loop thread sends its callers' calls (``stats`` are theirs)."""
        stats.sent(len(calls))
        try:
            async with self._using(None) as conn:
                if len(calls) == 1:
                    calls[0].id = await self._enqueue_one(conn, group.lone_params(calls[0]), calls[0].row)
                    return
                todo = group.in_key_order(calls)
                ids: list[int | None] = [None] * len(todo)
                try:
                    await self._insert_many(conn, [c.row for c in todo], group.labels_json(todo), ids)
                finally:
                    group.take(todo, ids)
        except JobqError as exc:
            for call in group.alone_after(calls, exc):
                await self._send_calls([call], stats)
        group.lost_races(calls)

    async def _insert_many(self, conn: AnyConnection, rows: Sequence[encode.TaskRow], labels: Sequence[str | None],
                           ids: list[int | None]) -> None:
        """As the sync client's ``_insert_many``."""
        todo = list(range(len(rows)))
        for _ in range(RACE_RETRIES):
            found = await self._fetch(conn, self.q.enqueue_many,
                                      encode.enqueue_many_params([rows[i] for i in todo], [labels[i] for i in todo]))
            todo = encode.merge_batch_ids(ids, todo, found)
            if not todo:
                return

    async def enqueue_many(self, type: str, items: Iterable[Any], *, labels: Sequence[str] | None = None,
                           connection: Any = None) -> list[int]:
        """Enqueue many tasks of one type in one transaction; see :meth:`jobqueue.Client.enqueue_many`."""
        items = list(items)
        lab = encode.labels(labels)
        if encode.bare_batch(items, lab):
            return await self._copy_bare(type, items, connection)
        rows = encode.rows_for(type, items, self.settings)
        if not rows:
            return []
        async with self._using(connection) as conn:
            if encode.has_dedupe_keys(rows):
                ids: list[int | None] = [None] * len(rows)
                async with _atomic(conn):
                    await self._insert_many(conn, rows, [encode.labels_json(lab)] * len(rows), ids)
                return all_ids(ids, type)
            new: list[int] = await conn.fetchval(self.q.reserve_ids, len(rows))
            await conn.copy_records_to_table(
                "tasks", schema_name=self.settings.schema_name, columns=list(encode.copy_columns(lab)),
                records=encode.copy_records(new, rows, lab))
            return new

    async def _copy_bare(self, type: str, items: list[Any], connection: Any) -> list[int]:
        """As the sync client's ``_copy_bare``, on a connection of the pool (asyncpg speaks UTF-8).

        The ids' statement is sent first and the payloads are made while it runs: those of the first
        EARLY_ROWS on our own connection (the rest as the COPY sends them), every one on a caller's.
        That round trip was a tenth of a 1,000-row batch's time."""
        bare = encode.BareCopy(type, self.settings)
        if not items:
            return []
        async with self._using(connection) as conn:
            reserving = asyncio.ensure_future(conn.fetchval(self.q.reserve_ids, len(items)))
            try:
                await asyncio.sleep(0)  # the task writes the statement on its first step
                early = bare.payloads(items if connection is not None else items[:EARLY_ROWS])
                ids: list[int] = await reserving
            except BaseException as exc:  # never hand back a connection with a statement still on it
                if isinstance(exc, asyncio.CancelledError):
                    reserving.cancel()  # else (a bad payload) the statement ends in a round trip
                await asyncio.wait([reserving])
                if not reserving.cancelled():
                    reserving.exception()  # retrieved: the error raised is the caller's
                raise
            await conn.copy_to_table("tasks", schema_name=self.settings.schema_name, columns=list(encode.BARE_COLUMNS),
                                     source=_lines(bare, ids, items, early), format="text")
            return ids

    async def get(self, task_id: int, *, connection: Any = None) -> Task:
        async with self._using(connection) as conn:
            row = await self._row(conn, task_id)
        if row is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return _task(row)

    async def list(
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
    ) -> list[Task]:
        """Newest first, filtered; see :meth:`jobqueue.Client.list`."""
        params = fields.list_params(status, type, owner, doc_id, label, before_id, limit, error)
        async with self._using(connection) as conn:
            return [_task(r) for r in await self._fetch(conn, self.q.list, params)]

    async def cancel(self, task_id: int | Sequence[int] | None = None, *, doc_id: int | None = None,
                     reason: str = "Task stopped by user.", connection: Any = None) -> dict[int, str]:
        """Cancel tasks by id and/or document; the same report as :meth:`jobqueue.Client.cancel`."""
        ids = encode.cancel_ids(task_id)
        async with self._using(connection) as conn:
            result = id_statuses(await self._fetch(conn, self.q.cancel,
                                                     encode.cancel_params(ids, doc_id, reason, self.settings)))
            for i in ids:
                if i not in result:
                    result[i] = status_of(i, await self._row(conn, i))
        return result

    async def retry(self, task_id: int | None = None, *, doc_id: int | None = None,
                    connection: Any = None) -> dict[int, str]:
        """As :meth:`jobqueue.Client.retry`."""
        ids = encode.retry_ids(task_id, doc_id)
        async with self._using(connection) as conn:
            result = id_statuses(await self._fetch(conn, self.q.retry, encode.retry_params(ids, doc_id, self.settings)))
            if task_id is not None and task_id not in result:
                raise not_retryable(task_id, await self._row(conn, task_id), doc_id)
        if not result:
            raise not_retryable(None, None, doc_id)
        return result

    async def cancel_where(self, *, type: str | None = None, owner: str | None = None, batch_id: int | None = None,
                           label: str | None = None, doc_id: int | None = None,
                           status: str | Sequence[str] | None = None, reason: str = "Task stopped by user.",
                           connection: Any = None) -> dict[int, str]:
        """As :meth:`jobqueue.Client.cancel_where`."""
        sel = encode.required("cancel", encode.selector("cancel", encode.CANCELLABLE, type, owner, batch_id,
                                                        label, doc_id, status))
        async with self._using(connection) as conn:
            return id_statuses(await self._fetch(conn, self.q.cancel_where,
                                                 encode.cancel_where_params(sel, reason, self.settings)))

    async def retry_where(self, *, type: str | None = None, owner: str | None = None, batch_id: int | None = None,
                          label: str | None = None, doc_id: int | None = None,
                          status: str | Sequence[str] | None = None, connection: Any = None) -> dict[int, str]:
        """As :meth:`jobqueue.Client.retry_where`."""
        sel = encode.required("retry", encode.selector("retry", encode.RETRYABLE, type, owner, batch_id, label,
                                                       doc_id, status))
        async with self._using(connection) as conn:
            return id_statuses(await self._fetch(conn, self.q.retry_where,
                                                 encode.retry_where_params(sel, self.settings)))

    async def prioritize(self, task_id: int | Sequence[int] | None = None, *, priority: int,
                         type: str | None = None, owner: str | None = None, batch_id: int | None = None,
                         label: str | None = None, doc_id: int | None = None,
                         status: str | Sequence[str] | None = None, connection: Any = None) -> builtins.list[int]:
        """As :meth:`jobqueue.Client.prioritize`."""
        ids = encode.cancel_ids(task_id)
        sel = encode.selector("prioritize", encode.REPRIORITISABLE, type, owner, batch_id, label, doc_id, status)
        params = encode.prioritize_params(ids, sel, priority)
        async with self._using(connection) as conn:
            changed = sorted(int(r["id"]) for r in await self._fetch(conn, self.q.prioritize, params))
            for i in ids:
                if i not in changed and sel.is_empty():
                    raise not_prioritized(i, await self._row(conn, i))
        return changed

    async def pause(self, type: str, *, connection: Any = None) -> None:
        """As :meth:`jobqueue.Client.pause`."""
        await self._set_queue(encode.queue_params(type, paused=True), connection)

    async def resume(self, type: str, *, connection: Any = None) -> None:
        await self._set_queue(encode.queue_params(type, paused=False), connection)

    async def cap(self, type: str, max_running: int, *, connection: Any = None) -> None:
        await self._set_queue(encode.queue_params(type, max_running=max_running), connection)

    async def uncap(self, type: str, *, connection: Any = None) -> None:
        await self._set_queue(encode.queue_params(type, uncap=True), connection)

    async def queues(self, *, connection: Any = None) -> builtins.list[QueueState]:
        """As :meth:`jobqueue.Client.queues`."""
        async with self._using(connection) as conn:
            return [QueueState.model_validate(r) for r in await self._fetch(conn, self.q.queues, ())]

    async def _set_queue(self, params: tuple[Any, ...], connection: Any) -> None:
        async with self._using(connection) as conn:
            await self._fetch(conn, self.q.set_queue, params)

    async def _row(self, conn: AnyConnection, task_id: int) -> dict[str, Any] | None:
        row = await conn.fetchrow(self.q.get, task_id)
        return None if row is None else dict(row)

    # -- waiting (jobqueue/client/wait.py)

    async def wait(self, task_id: int, *, timeout: float | None = None) -> Any:
        """As :meth:`jobqueue.Client.wait`: the result, or TaskFailed, or WaitTimeout."""
        watch = waits.Watch(waits.one_task(task_id), None, with_result=True)
        async for _ in self._follow(watch, timeout):
            pass
        return watch.outcome(task_id)

    def events(self, task_ids: int | Iterable[int] | None = None, *, doc_id: int | None = None,
               timeout: float | None = None) -> AsyncIterator[TaskEvent]:
        """As :meth:`jobqueue.Client.events`: ``async for event in client.events(doc_id=7)``."""
        return self._follow(waits.Watch(task_ids, doc_id), timeout)

    async def _follow(self, watch: waits.Watch, timeout: float | None) -> AsyncIterator[TaskEvent]:
        deadline = waits.Deadline(timeout)
        waker = waits.LoopWaker()
        feed = waits.hub().join(self.settings, self.url, watch, waker)
        try:
            while True:
                waker.event.clear()  # before the read: a wake-up during it is not lost
                async with self._using(None) as conn:
                    rows = await self._fetch(conn, waits.statements(self.settings).watch, watch.params())
                for event in watch.update(rows):
                    yield event
                if watch.finished:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waker.event.wait(), waits.sleep_for(feed, self.settings, deadline, watch))
        finally:
            waits.hub().leave(feed, watch, waker)


async def _session_unchanged(conn: asyncpg.Connection) -> None:
    """The pool's release hook, in place of asyncpg's reset query (``RESET ALL``, ``UNLISTEN *``,
    ``CLOSE ALL``, advisory unlocks): one more round trip after every call, to undo what this
    client's statements never do (no SET, LISTEN, cursor or session lock; the waiters' LISTEN has
    a connection of its own). asyncpg still rolls back a transaction left open before this runs."""


def _task(row: dict[str, Any]) -> Task:
    """A task from an asyncpg row: asyncpg hands jsonb over as its JSON text (psycopg decodes it)."""
    for column in JSONB_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = json.loads(row[column])
    return Task.model_validate(row)


async def _lines(bare: encode.BareCopy, ids: list[int], items: list[Any], early: list[str]) -> AsyncIterator[bytes]:
    """asyncpg's COPY source, a chunk at a time: the payloads of the first ``len(early)`` rows were made
    (and validated) before the COPY, the others are made as their chunk is sent."""
    for part in encode.chunks(len(items)):
        made = early[part]
        if len(made) < part.stop - part.start:
            made += bare.payloads(items[part.start + len(made):part.stop])
        yield bare.lines(ids[part], made)


def _atomic(conn: AnyConnection) -> AbstractAsyncContextManager[Any]:
    """A transaction when the connection is not in one (asyncpg's default is autocommit); see the sync
    client's ``_atomic`` for why enqueueing with dependencies needs it (issue 11, item 13)."""
    if conn.is_in_transaction():
        return nullcontext()
    tx: AbstractAsyncContextManager[Any] = conn.transaction()
    return tx


__all__ = ["AsyncClient"]
