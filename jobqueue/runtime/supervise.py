"""One backoff and one error classification for every loop and every database call of the runtime.

Why one place: before it, the claim loop retried every 0.2 s, `_db` doubled to 2 s, the listener to
5 s, and any PostgreSQL error outside a fixed list of connection errors escaped and killed the loop
it happened in (the heartbeat, the completer, the progress writer), silently, for the rest of the
process. Now:

- `is_transient(exc)` decides by SQLSTATE class what is worth retrying: deadlock (40P01),
  serialization failure (40001), lock not available (55P03), statement timeout / cancel (57014),
  too many connections (53300), connection exceptions (08xxx), operator intervention (57Pxx: admin
  shutdown, crash shutdown, cannot connect now), plus the driver-level connection errors that have no
  SQLSTATE (socket errors, timeouts, a connection left mid-operation by a server restart);
- `Outage` is shared by every part of one worker, so an outage logs one line when it starts
  ("database unreachable, retrying") and one when it ends ("database back after 19.8 s"), however
  many loops were retrying meanwhile;
- `Backoff` is the one delay schedule (exponential with jitter, capped);
- `supervise()` runs a background loop forever: an unexpected error is logged loudly with its
  traceback and the loop restarts after a backoff; if it keeps failing, the worker is told to stop
  with a non-zero exit instead of going on half-alive.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from jobqueue.db.connect import redact_text

log = logging.getLogger("jobq.worker")

# SQLSTATEs retried as they are, and classes (first two characters) retried whole.
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001", "55P03", "57014", "53300"})
TRANSIENT_CLASSES = frozenset({"08", "57"})
# Driver errors without a SQLSTATE that mean "the connection, not the statement, failed".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    # a connection left mid-operation by a server restart ("cannot switch to state 12; another
    # operation is in progress"): the pool drops it on release; retry on another one
    asyncpg.InternalClientError,
)

# Defaults of the one backoff: first retry after 50 ms, doubling, capped at 5 s, jitter in [0.5, 1].
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
# A supervised loop that fails this many times in a row without one clean pass gives up the worker.
MAX_CONSECUTIVE_CRASHES = 5


def sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry of the same statement can get past (see the module docstring)."""
    state = sqlstate(exc)
    if state is not None:
        return state in TRANSIENT_SQLSTATES or state[:2] in TRANSIENT_CLASSES
    return isinstance(exc, CONNECTION_ERRORS)


def is_connection_problem(exc: BaseException) -> bool:
    """Transient errors that say the server is unreachable (as opposed to a lock conflict)."""
    state = sqlstate(exc)
    if state is not None:
        return state == "53300" or state[:2] in TRANSIENT_CLASSES
    return isinstance(exc, CONNECTION_ERRORS)


class Backoff:
    """Exponential delays with jitter: `await backoff.wait()` sleeps the next one, `reset()` starts over."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> None:
        self.first, self.cap = first, cap
        self.attempts = 0

    def next_delay(self) -> float:
        delay: float = min(self.cap, self.first * 2.0 ** min(self.attempts, 30))
        self.attempts += 1
        return float(delay * random.uniform(0.5, 1.0))

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        self.attempts = 0


class Outage:
    """Whether the database is reachable, as seen by every part of one worker: one log line per change."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.log = logger
        self.since: float | None = None
        self.retries = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, where: str) -> None:
        if not is_connection_problem(exc):
            # A lock conflict or timeout on a reachable server: worth a line each, they are rare.
            self.log.warning("%s: %s (SQLSTATE %s); retrying", where, redact_text(str(exc)) or type(exc).__name__,
                             sqlstate(exc))
            return
        self.retries += 1
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("database unreachable (%s: %s), retrying", where,
                             redact_text(str(exc)) or type(exc).__name__)

    def succeeded(self) -> None:
        if self.since is not None:
            self.log.warning("database back after %.1f s (%d retries)", time.monotonic() - self.since,
                             self.retries)
            self.since = None
            self.retries = 0


async def retry(fn: Callable[[], Awaitable[Any]], outage: Outage, where: str, *,
                backoff: Backoff | None = None, give_up: Callable[[], bool] | None = None) -> Any:
    """`await fn()` until it succeeds, retrying transient errors with the one backoff.

    Anything else propagates (the supervisor of the calling loop logs and restarts it). `give_up`
    lets a stopping worker leave the loop: the last transient error is then raised.
    """
    backoff = backoff or Backoff()
    while True:
        try:
            result = await fn()
        except Exception as exc:
            if not is_transient(exc) or (give_up is not None and give_up()):
                raise
            outage.failed(exc, where)
            await backoff.wait()
            continue
        outage.succeeded()
        return result


class Fatal(Exception):
    """A supervised loop could not recover: the worker stops and exits non-zero."""


async def supervise(name: str, loop: Callable[[], Awaitable[None]], on_fatal: Callable[[BaseException], None],
                    *, max_crashes: int = MAX_CONSECUTIVE_CRASHES, healthy_after: float = 30.0) -> None:
    """Run `loop()` for the life of the worker, restarting it after an unexpected error.

    `loop` is expected to run forever; returning is treated as the end of its job. A crash is logged
    with its traceback (loudly: it is a bug or an unexpected server state) and the loop restarts after
    the backoff. A loop that ran `healthy_after` seconds before crashing starts a fresh count; after
    `max_crashes` crashes in a row `on_fatal` is called, so the worker stops instead of running half-alive.
    """
    backoff = Backoff(first=0.2)
    crashes = 0
    while True:
        started = time.monotonic()
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() - started >= healthy_after:
                crashes = 0
                backoff.reset()
            crashes += 1
            log.error("background loop %s crashed (%d/%d): %s", name, crashes, max_crashes,
                      redact_text(f"{type(exc).__name__}: {exc}"), exc_info=exc)
            if crashes >= max_crashes:
                log.critical("background loop %s cannot recover; stopping the worker", name)
                on_fatal(exc)
                return
            await backoff.wait()


class _PoolFloorFilter(logging.Filter):
    """asyncpg's pool logs a full traceback every time it fails to reconnect its idle connections
    ("Failed to restore the pool connection floor"), i.e. many per outage. The worker's own Outage
    already says the database is unreachable, once: keep asyncpg's line at debug level, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "connection floor" in str(record.msg):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_POOL_FILTER = _PoolFloorFilter()


def quiet_asyncpg_pool() -> None:
    """Install the filter above (idempotent)."""
    pool_log = logging.getLogger("asyncpg.pool")
    if _POOL_FILTER not in pool_log.filters:
        pool_log.addFilter(_POOL_FILTER)
