"""The LISTEN connection: one dedicated asyncpg connection, never from the pool.

A pool may sit behind PgBouncer in transaction mode, where LISTEN does not work; this connection
goes straight to PostgreSQL. NOTIFY is a hint, never the only path: when the connection dies
(database restart, pg_terminate_backend, network cut) it reconnects with backoff, and every
(re)connect triggers a catch-up claim, so a notification lost in between costs nothing. A periodic
ping finds a connection that died silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from jobqueue.db.queries import ServerSQL
from jobqueue.runtime.supervise import Backoff, Outage

log = logging.getLogger("jobq.listener")
_PING = ServerSQL.load("").ping


class Listener:
    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        on_connect: Callable[[], None],
        *,
        ping_seconds: float = 5.0,
        outage: Outage | None = None,
        application_name: str | None = None,
    ) -> None:
        self.url = url
        # Shown in pg_stat_activity, so an operator (or a test) can count these connections.
        self.server_settings = {"application_name": application_name} if application_name else None
        self.channels = list(channels)
        self.on_notify = on_notify
        self.on_connect = on_connect
        self.ping_seconds = ping_seconds
        # Shared with the worker's other parts, so an outage is logged once, not once per part.
        self.outage = outage or Outage(log)
        self.reconnects = 0
        self.connected = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._stopping = False

    def _callback(self, _conn: Any, _pid: int, channel: str, payload: object) -> None:
        self.on_notify(channel, str(payload))

    def _terminated(self, _conn: Any) -> None:
        self.connected.clear()
        self._lost.set()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.url, statement_cache_size=0, timeout=10,
                                     server_settings=self.server_settings)
        conn.add_termination_listener(self._terminated)
        for ch in self.channels:
            await conn.add_listener(ch, self._callback)
        self._conn = conn
        self._lost.clear()
        self.connected.set()

    async def run(self) -> None:
        backoff = Backoff()
        first = True
        while not self._stopping:
            try:
                await self._connect()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                self.outage.failed(exc, "LISTEN connection")
                await backoff.wait()
                continue
            except Exception:  # never end silently: whoever relies on NOTIFY would wait on polls only
                log.exception("LISTEN connection: unexpected error while connecting; retrying")
                await backoff.wait()
                continue
            self.outage.succeeded()
            if not first:
                self.reconnects += 1
                log.info("LISTEN connection re-established")
            first = False
            backoff.reset()
            try:
                self.on_connect()
                await self._watch()
            except Exception:
                log.exception("LISTEN connection: unexpected error; reconnecting")
                await backoff.wait()
            finally:
                await self._close()

    async def _watch(self) -> None:
        """Return when the connection is gone (terminated, or failing its ping)."""
        while not self._stopping:
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=self.ping_seconds)
                return
            except TimeoutError:
                pass
            conn = self._conn
            if conn is None or conn.is_closed():
                return
            try:
                await asyncio.wait_for(conn.fetchval(_PING), timeout=self.ping_seconds)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                log.warning("LISTEN connection failed its ping; reconnecting")
                return

    async def _close(self) -> None:
        self.connected.clear()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)
            if not conn.is_closed():
                conn.terminate()

    async def stop(self) -> None:
        self._stopping = True
        self._lost.set()
        await self._close()
