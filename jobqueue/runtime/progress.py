"""The progress writer: every running task's coalesced progress in one statement per interval.

``ctx.progress()`` only marks its task dirty (from any thread); every ``progress_interval`` the
writer sends the newest value and the pending lines of all dirty tasks in one ``progress_many``,
which locks the rows in id order and is fenced by (id, attempt, worker_id). Its answer says which
tasks have a cancel pending and which are no longer ours; the worker acts on both.

The flush takes its lines before its statement runs, so the task may finish (or a user may request
its cancel) in between: the statement then writes the lines above the log's last line, which stays
the final state's ("Done in ...", "[Canceled] ..."), rather than below it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from jobqueue.db.queries import RuntimeSQL
from jobqueue.observe import metrics
from jobqueue.runtime.context import Context
from jobqueue.runtime.executor import Attempt, take_pending


class ProgressWriter:
    def __init__(
        self,
        q: RuntimeSQL,
        *,
        worker_id: str,
        log_chars: int,
        interval: float,
        db: Callable[..., Awaitable[Any]],
        on_rows: Callable[[list[asyncpg.Record], list[tuple[int, int]]], None],
    ) -> None:
        self.q = q
        self.worker_id = worker_id
        self.log_chars = log_chars
        self.interval = interval
        self.running: dict[int, Attempt] = {}  # the dispatcher's map of running attempts (set by it)
        self._db = db
        self._on_rows = on_rows
        self._dirty: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, ctx: Context) -> None:
        """Context's on_progress hook: called from the loop or from a handler's thread."""
        loop = self._loop
        if loop is None:
            return
        try:
            running_loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running_loop = None
        if running_loop is loop:
            self._dirty.add(ctx.id)
        else:
            loop.call_soon_threadsafe(self._dirty.add, ctx.id)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            if self._dirty:
                await self.flush()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def flush(self) -> None:
        ids, self._dirty = self._dirty, set()
        batch = sorted(((a.ctx, *take_pending(a.ctx)) for i in ids if (a := self.running.get(i)) is not None),
                       key=lambda b: b[0].id)
        if not batch:
            return

        async def write(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(
                self.q.progress_many, [c.id for c, _, _ in batch], [c.attempt for c, _, _ in batch],
                [p for _, p, _ in batch], [lines for _, _, lines in batch], self.log_chars, self.worker_id)
            return rows

        rows = await self._db(write)
        metrics.PROGRESS_WRITES.inc()
        self._on_rows(rows, [(c.id, c.attempt) for c, _, _ in batch])
