"""The runtime's connections: its pool, and the one entry point for calls that must eventually succeed.

`call(pool, outage, fn, *args)` runs `fn(conn, *args)` on a pooled connection and retries transient errors
(see `supervise.is_transient`) with the one backoff, reporting them to the worker's `Outage`: a
database restart, a full server (53300), a deadlock or a lock timeout delays a write, never drops
it, and costs one log line per outage. Every runtime statement has a command timeout
(JOBQ_COMMAND_TIMEOUT_SECONDS), so a half-open connection turns into a retry instead of a hang.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from jobqueue.runtime.supervise import Outage, retry
from jobqueue.settings import Settings

RUNTIME_POOL_SIZE = 4  # claims, completions, progress, heartbeat


async def keep_session(conn: Any) -> None:
    """Pool reset that keeps the session as it is (asyncpg still rolls back an open transaction)."""


async def create_pool(url: str, settings: Settings, outage: Outage, *, concurrency: int, for_handlers: bool = False,
                      give_up: Callable[[], bool] | None = None) -> asyncpg.Pool:
    """The runtime's pool (claims, completions, progress, heartbeats), or the pool handlers borrow
    from through ctx.connection() / ctx.transaction(), retried until the server accepts it.

    The runtime's connections skip asyncpg's reset on release (UNLISTEN, RESET ALL, ... : one more
    round trip after every claim, measured at ~0.3 ms of each claim's latency); jobq never changes
    session state on them (claims use set_config(..., true), which ends with the transaction).
    Handlers' connections keep the reset, and no command timeout: their code may change session
    state and run long statements on purpose.
    """

    async def create() -> asyncpg.Pool:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            url, min_size=0 if for_handlers else 2,
            max_size=min(concurrency, 16) if for_handlers else RUNTIME_POOL_SIZE, timeout=10,
            statement_cache_size=100 if settings.prepared_statements else 0,
            command_timeout=None if for_handlers else settings.command_timeout_seconds,
            reset=None if for_handlers else keep_session,
        )
        return pool

    pool: asyncpg.Pool = await retry(create, outage, "connecting", give_up=give_up)
    return pool


async def call(pool: asyncpg.Pool, outage: Outage, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """`fn(conn, *args)` on a connection of `pool`, retried on transient errors until it succeeds."""

    async def once() -> Any:
        async with pool.acquire() as conn:
            return await fn(conn, *args)

    return await retry(once, outage, getattr(fn, "__name__", "database call").lstrip("_"))
