"""Synchronous reads on asyncpg for a short-lived process: the read-only CLI and a worker's start-up check.

Such a process runs one to three statements, so its start-up is its cost, and importing asyncpg takes
about half the time importing psycopg does (~100 ms against ~180 ms on this machine: psycopg loads
importlib.metadata, its type adapters and asyncio at import). `jobq ls` reads through here and never
imports psycopg; the worker's runtime is on asyncpg anyway.

Every driver error, including those asyncpg raises without a SQLSTATE when the connection breaks under
a call ("cannot switch to state ..."), becomes a JobqError, and a broken connection is dropped without
raising a second error on the way out: the user sees one line, never a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from jobqueue.db.connect import aconnect
from jobqueue.db.errors import translate

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")
_CLOSE_TIMEOUT = 5.0  # seconds: a close that hangs on a dead server must not hold the command


class Reader:
    """One asyncpg connection driven from synchronous code, on the event loop of :func:`reading`."""

    def __init__(self, runner: asyncio.Runner, conn: asyncpg.Connection) -> None:
        self._runner = runner
        self.conn = conn

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        """Await `call` (made on :attr:`conn`) on this reader's loop."""
        return self._runner.run(call)

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of `sql` ($1 style) with `params`, as dicts by column name (as db/fetch.py's)."""
        return [dict(r) for r in self.run(self.conn.fetch(sql, *params))]


@contextmanager
def reading(url: str) -> Iterator[Reader]:
    """A :class:`Reader` on `url`; driver errors inside the block leave it as JobqErrors."""
    from jobqueue.db.asyncpg_errors import DRIVER_ERRORS

    closing: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, asyncio.CancelledError)
    with asyncio.Runner() as runner:
        conn = runner.run(aconnect(url))
        try:
            yield Reader(runner, conn)
        except DRIVER_ERRORS as exc:
            conn.terminate()
            raise translate(exc) from None
        finally:
            if not conn.is_closed():
                try:
                    runner.run(conn.close(timeout=_CLOSE_TIMEOUT))
                except closing:
                    conn.terminate()
