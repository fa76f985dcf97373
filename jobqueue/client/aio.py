"""The async producer API on asyncpg; same rules as :mod:`jobqueue.client.sync`.

Pass the caller's asyncpg connection (or a SQLAlchemy AsyncConnection/AsyncSession on the asyncpg
driver) to enqueue inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from jobqueue.client.sync import (
    DEPENDENT_CANCELLED,
    RETRY_LINE,
    TaskSpec,
    _first_line,
    _labels,
    _plan_dependencies,
    _row,
    _stamp,
    not_retried,
    retry_targets,
    rows_for,
)
from jobqueue.db.connect import redact, resolve_url
from jobqueue.db.queries import ClientSQL
from jobqueue.errors import (
    DatabaseUnavailable,
    DedupeConflict,
    InvalidPayload,
    JobqError,
    PermissionDenied,
    TaskNotFound,
)
from jobqueue.models import Task
from jobqueue.settings import Settings, get_settings

AnyConnection = Any  # asyncpg.Connection or a pool's proxy of one


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


class AsyncClient:
    """Async producer: a small asyncpg pool of its own, or the caller's connection."""

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._url = url
        self.q = ClientSQL.load(self.settings.schema_name)
        self._pool: asyncpg.Pool | None = None

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            url = self._url or resolve_url(self.settings)
            try:
                self._pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
            except (OSError, asyncpg.PostgresError) as exc:
                raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {exc}") from None
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, connection: Any, fn: Any) -> Any:
        """Run `fn(conn)` in the caller's transaction, or in a transaction of our own."""
        try:
            if connection is not None:
                conn = await asyncpg_connection(connection)
                if conn is None:
                    raise JobqError(f"unsupported connection type {type(connection).__name__} for the async API")
                return await fn(conn)
            pool = await self._get_pool()
            async with pool.acquire() as conn, conn.transaction():
                return await fn(conn)
        except asyncpg.ForeignKeyViolationError as exc:
            raise InvalidPayload(f"rejected by the database: {exc.detail or str(exc).splitlines()[0]}") from None
        except (asyncpg.DataError, asyncpg.CheckViolationError, asyncpg.ProgramLimitExceededError) as exc:
            raise InvalidPayload(f"rejected by the database: {str(exc).splitlines()[0]}") from None

    async def enqueue(self, type: str, payload: Any = None, *, labels: Sequence[str] | None = None,
                      depends_on: Sequence[int] | None = None, connection: Any = None, **fields: Any) -> int:
        """Enqueue one task; keyword fields as :meth:`jobqueue.Client.enqueue`."""
        row = _row(type, TaskSpec(payload=payload, **fields), self.settings)
        lab = _labels(labels)
        deps = sorted(set(depends_on)) if depends_on else None

        async def go(conn: AnyConnection) -> int:
            status, pending, line = "queued", 0, ""
            if deps:
                parents = await conn.fetch(self.q.lock_parents, deps)
                status, pending, line = _plan_dependencies([(r[0], r[1]) for r in parents], deps)
            params = (*row[:11], lab, row[11], status, deps, pending, line)
            rows = await conn.fetch(self.q.enqueue, *params) or await conn.fetch(self.q.enqueue, *params)
            return int(rows[0][0])

        return int(await self._run(connection, go))

    async def enqueue_many(self, type: str, items: Iterable[Any], *, labels: Sequence[str] | None = None,
                           connection: Any = None) -> list[int]:
        rows = rows_for(type, items, self.settings)
        lab = _labels(labels) or []
        if not rows:
            return []
        schema = self.settings.schema_name

        async def go(conn: AnyConnection) -> list[int]:
            if any(r[5] is not None for r in rows):
                cols = [list(c) for c in zip(*rows, strict=True)]
                return [int(r[1]) for r in await conn.fetch(self.q.enqueue_many, *cols, lab)]
            ids = [r[0] for r in await conn.fetch(
                f"SELECT nextval('{schema}.tasks_id_seq') FROM generate_series(1, $1)", len(rows))]
            now = datetime.now(UTC)
            await conn.copy_records_to_table(
                "tasks", schema_name=schema,
                columns=["id", "type", "priority", "payload", "run_at", "max_retries", "dedupe_key", "doc_id",
                         "batch_id", "from_page", "to_page", "owner", "digest", "labels"],
                records=[(i, r[0], r[1], r[2], r[3] or now, *r[4:], lab) for i, r in zip(ids, rows, strict=True)],
            )
            return [int(i) for i in ids]

        result: list[int] = await self._run(connection, go)
        return result

    async def get(self, task_id: int, *, connection: Any = None) -> Task:
        async def go(conn: AnyConnection) -> Task:
            row = await conn.fetchrow(self.q.get, task_id)
            if row is None:
                raise TaskNotFound(f"no task with id {task_id}")
            return Task.model_validate(dict(row))

        task: Task = await self._run(connection, go)
        return task

    async def cancel(self, task_id: int | Sequence[int] | None = None, *, doc_id: int | None = None,
                     reason: str = "Task stopped by user.", connection: Any = None) -> dict[int, str]:
        ids = [task_id] if isinstance(task_id, int) else list(task_id or [])
        n = self.settings.progress_log_chars

        async def go(conn: AnyConnection) -> dict[int, str]:
            try:
                rows = await conn.fetch(self.q.cancel, ids, doc_id, _stamp(f"[Canceled] {reason}"), n,
                                        _stamp(DEPENDENT_CANCELLED))
            except asyncpg.InsufficientPrivilegeError as exc:
                raise PermissionDenied(_first_line(exc)) from None
            return {int(r[0]): str(r[1]) for r in rows}

        result: dict[int, str] = await self._run(connection, go)
        return result

    async def retry(self, task_id: int | None = None, *, doc_id: int | None = None,
                    connection: Any = None) -> dict[int, str]:
        """As :meth:`jobqueue.Client.retry`."""
        ids = retry_targets(task_id, doc_id)

        async def go(conn: AnyConnection) -> dict[int, str]:
            try:
                rows = await conn.fetch(self.q.retry, ids, doc_id, _stamp(RETRY_LINE), self.settings.progress_log_chars)
            except asyncpg.UniqueViolationError as exc:
                raise DedupeConflict(_first_line(exc)) from None
            except asyncpg.InsufficientPrivilegeError as exc:
                raise PermissionDenied(_first_line(exc)) from None
            result = {int(r[0]): str(r[1]) for r in rows}
            if task_id is not None and task_id not in result:
                status = await conn.fetchval(self.q.task_status, task_id)
                if status is None:
                    raise TaskNotFound(f"no task with id {task_id}")
                raise not_retried(task_id, status)
            if not result:
                raise not_retried(None, None, doc_id)
            return result

        done: dict[int, str] = await self._run(connection, go)
        return done


__all__ = ["AsyncClient"]
