"""Task types: the handler, its payload model and its per-type settings.

Types register in-process with :func:`task`, and installed packages register through the entry
point group ``jobq.tasks`` (each entry point names a module whose import registers its types), so
a producer validates the payloads of every type a worker could run.

A producer that does not import the handlers (an API server, while GPU workers run them) can
:func:`declare` a type's payload model and defaults without a handler, or enqueue a type it knows
nothing of: the name is checked, the payload only as JSON (a typo shows as a queued type nobody serves).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel

from jobqueue.errors import ConfigurationError, UnknownTaskType
from jobqueue.settings import get_settings
from jobqueue.states import type_channel

if TYPE_CHECKING:
    from jobqueue.cron import Cron

ENTRY_POINT_GROUP = "jobq.tasks"
# The tasks table's CHECK on type (migrations/versions/0001_tasks.py): a name it refuses could be
# registered and run by nobody, so it is refused here, at registration.
TYPE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,48}")
# PostgreSQL's identifier limit (NAMEDATALEN - 1) applies to NOTIFY channels: `<schema>.<type>` wakes
# the type's workers, so a longer one would make every enqueue of the type fail.
CHANNEL_MAX_BYTES = 63
Isolation = Literal["thread", "process"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TaskType:
    name: str
    handler: Callable[..., Any]
    payload: type[BaseModel] | None = None
    max_retries: int | None = None
    # Soft timeout: the handler is told (its `cancelled` flag is set and async handlers get
    # TimeoutError); hard timeout: the attempt is abandoned and counted as a failure.
    timeout: float | None = None
    hard_timeout: float | None = None
    # Worker-local limit of concurrently running tasks of this type (RAGFlow's semaphores).
    concurrency: int | None = None
    priority: int = 0
    backoff_base: float | None = None
    backoff_max: float | None = None
    isolation: Isolation = "thread"
    # Flow control in the claim (fair_by, limit_by/limit, rate/rate_by), None when none is declared.
    flow: Flow | None = None
    # Retry only on these exception types (others fail the task at once); None: retry on any error.
    retry_on: tuple[type[BaseException], ...] | None = None
    # The delay before retry n (1 for the first), replacing the exponential backoff and its jitter.
    backoff: Callable[[int], float] | None = None
    # A periodic task: its schedule (named after the type), and how many missed ticks to catch up.
    cron: Cron | None = None
    cron_backfill: int | None = None

    @cached_property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)


_registry: dict[str, TaskType] = {}
_declared: dict[str, TaskType] = {}
_entry_points_loaded = False
_load_errors: dict[str, str] = {}


def task(
    name: str,
    *,
    payload: type[BaseModel] | None = None,
    max_retries: int | None = None,
    timeout: float | None = None,
    hard_timeout: float | None = None,
    concurrency: int | None = None,
    priority: int = 0,
    backoff_base: float | None = None,
    backoff_max: float | None = None,
    isolation: Isolation = "thread",
    fair_by: str | None = None,
    limit_by: str | None = None,
    limit: int | None = None,
    rate: str | None = None,
    rate_by: str | None = None,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    backoff: Callable[[int], float] | None = None,
    cron: str | None = None,
    tz: str | None = None,
    cron_backfill: int | None = None,
) -> Callable[[F], F]:
    """Register a handler for task type `name`.

    The handler is ``async def h(ctx, payload)`` or a plain ``def h(ctx, payload)`` (run in a thread,
    or a child process with ``isolation="process"``); its return value is stored as the result.

    Flow control (enforced by the claim, across all workers): ``fair_by`` a key (``owner``,
    ``doc_id``, ``batch_id`` or ``payload.<field>``) to claim round-robin across keys within each
    priority; ``limit_by`` and ``limit`` at most that many running tasks per key; ``rate`` (``"600/m"``,
    ``"50/s"``, ``"1000/h"``, ``"10/5s"``) started tasks per sliding window, per key with ``rate_by``.

    ``retry_on`` retries only those exception types (any other error fails the task at once);
    ``backoff(n)`` is the delay in seconds before retry n. ``cron`` (with ``tz``, default UTC) makes it
    a periodic task: the workers serving the type enqueue one task per tick (see jobqueue/cron.py).
    """
    check_name(name, get_settings().schema_name)
    flow = parse_flow(name, fair_by=fair_by, limit_by=limit_by, limit=limit, rate=rate, rate_by=rate_by)
    schedule = None if cron is None else check_schedule(name, name, cron, tz, cron_backfill)
    if schedule is not None and payload is not None:
        try:  # a code-declared schedule enqueues {}: a model that refuses it would fail every tick
            payload.model_validate({})
        except ValueError:
            raise ConfigurationError(f"task {name!r}: a cron task is enqueued with an empty payload, which its "
                                     f"payload model {payload.__name__} refuses (give its fields defaults)") from None
    if tz is not None and cron is None:
        raise ConfigurationError(f"task {name!r}: tz= is the time zone of a cron schedule; give cron= too")
    retry_types = (retry_on,) if isinstance(retry_on, type) else retry_on
    if retry_types is not None and not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_types):
        raise ConfigurationError(f"task {name!r}: retry_on must be exception types")
    if retry_types is not None and isolation == "process":  # the child's exception arrives as its text
        raise ConfigurationError(f"task {name!r}: retry_on cannot match the exceptions of a process-isolated handler")
    if backoff is not None and not callable(backoff):
        raise ConfigurationError(f"task {name!r}: backoff must be a function of the retry number")

    def register(fn: F) -> F:
        if isolation == "process" and asyncio.iscoroutinefunction(fn):
            raise ConfigurationError(f"task {name!r}: process isolation is for plain (sync) handlers")
        _registry[name] = TaskType(
            name=name, handler=fn, payload=payload, max_retries=max_retries, timeout=timeout,
            hard_timeout=hard_timeout, concurrency=concurrency, priority=priority,
            backoff_base=backoff_base, backoff_max=backoff_max, isolation=isolation, flow=flow, retry_on=retry_types,
            backoff=backoff, cron=schedule, cron_backfill=cron_backfill,
        )
        return fn

    return register


def declare(
    name: str,
    *,
    payload: type[BaseModel] | None = None,
    max_retries: int | None = None,
    priority: int = 0,
) -> None:
    """Describe a type this process enqueues but does not run: its payload model (validated at enqueue)
    and defaults, without importing the handler's code. A registered handler of the same name wins."""
    check_name(name, get_settings().schema_name)
    _declared[name] = TaskType(name=name, handler=_no_handler, payload=payload, max_retries=max_retries,
                               priority=priority)


def _no_handler(*_: Any) -> None:
    raise ConfigurationError("a declared task type has no handler in this process")


def for_enqueue(name: str, schema: str) -> TaskType:
    """What this process knows of a type it enqueues: registered, declared, or only a valid name.

    A plug-in that fails to load counts as unknown here: a producer must not need the handler's
    dependencies (the worker, which does, still refuses to start).
    """
    if name not in _registry and name not in _declared:
        load_entry_points()
    known = _registry.get(name) or _declared.get(name)
    if known is not None:
        return known
    try:
        check_name(name, schema)
    except ConfigurationError as exc:
        raise UnknownTaskType(str(exc)) from None
    return TaskType(name=name, handler=_no_handler)


def check_name(name: str, schema: str) -> None:
    """Refuse a type name the database would refuse later: at enqueue, or worse, at the first NOTIFY."""
    if not isinstance(name, str) or not TYPE_NAME.fullmatch(name):
        raise ConfigurationError(
            f"task type name {name!r} must be 1-48 characters among letters, digits and _ . : -")
    channel = type_channel(schema, name)
    if len(channel.encode()) > CHANNEL_MAX_BYTES:
        room = CHANNEL_MAX_BYTES - len(schema.encode()) - 1
        raise ConfigurationError(
            f"task type name {name!r} is too long for schema {schema!r}: its NOTIFY channel {channel!r} would be "
            f"{len(channel.encode())} bytes, PostgreSQL allows {CHANNEL_MAX_BYTES} (at most {room} characters here)")


# ------------------------------------------------------------------ flow control (issue 14)

# The columns a flow key may name; `payload.<field>` names a top-level payload field.
FLOW_COLUMNS = ("owner", "doc_id", "batch_id")
PAYLOAD_KEY = re.compile(r"payload\.([A-Za-z0-9_-]{1,64})")
RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*(s|sec|second|m|min|minute|h|hour)\s*")
RATE_UNIT_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


@dataclass(frozen=True)
class Flow:
    """A type's flow declaration, as the claim takes it (runtime/flow.py, runtime.sql claim_flow)."""

    key: str | None  # the one key fairness, the limit and a per-key rate use; None: the type as a whole
    fair: bool = False
    limit: int | None = None
    rate: int | None = None  # tasks started per rate_seconds (a sliding window)
    rate_seconds: float = 1.0
    rate_by_key: bool = False


def parse_flow(name: str, *, fair_by: str | None, limit_by: str | None, limit: int | None, rate: str | None,
               rate_by: str | None) -> Flow | None:
    """Refuse a declaration the claim could not honour, in one line, at registration."""
    keys = {opt: _flow_key(name, opt, value) for opt, value in
            (("fair_by", fair_by), ("limit_by", limit_by), ("rate_by", rate_by)) if value is not None}
    if len(set(keys.values())) > 1:
        named = ", ".join(f"{opt}={value!r}" for opt, value in keys.items())
        raise ConfigurationError(f"task {name!r}: fair_by, limit_by and rate_by must name the same key ({named})")
    if (limit is None) != (limit_by is None):
        raise ConfigurationError(f"task {name!r}: limit and limit_by go together (e.g. limit_by='owner', limit=4)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(f"task {name!r}: limit must be a whole number of at least 1, not {limit!r}")
    if rate_by is not None and rate is None:
        raise ConfigurationError(f"task {name!r}: rate_by needs a rate (e.g. rate='600/m')")
    count, seconds = _rate(name, rate) if rate is not None else (None, 1.0)
    if not keys and rate is None:
        return None
    return Flow(key=next(iter(keys.values()), None), fair=fair_by is not None, limit=limit, rate=count,
                rate_seconds=seconds, rate_by_key=rate_by is not None)


def _flow_key(name: str, option: str, value: object) -> str:
    if isinstance(value, str) and (value in FLOW_COLUMNS or PAYLOAD_KEY.fullmatch(value)):
        return value
    raise ConfigurationError(f"task {name!r}: {option}={value!r} is not a key "
                             f"(one of {', '.join(FLOW_COLUMNS)} or payload.<field>)")


def _rate(name: str, rate: object) -> tuple[int, float]:
    m = RATE.fullmatch(rate) if isinstance(rate, str) else None
    count = int(m.group(1)) if m else 0
    seconds = float(m.group(2) or 1) * RATE_UNIT_SECONDS[m.group(3)] if m else 0.0
    if count < 1 or seconds <= 0 or count > 2**31 - 1:
        raise ConfigurationError(f"task {name!r}: rate={rate!r} is not a rate like '600/m', '50/s' or '10/5s'")
    return count, seconds


def check_schedule(name: str, task_type: str, cron: str, tz: str | None, backfill: int | None) -> Cron:
    """Refuse a schedule the scheduler could not fire: its name, type, expression, time zone, backfill."""
    from jobqueue.cron import MAX_BACKFILL, parse

    if not isinstance(name, str) or not TYPE_NAME.fullmatch(name):
        raise ConfigurationError(f"schedule name {name!r} must be 1-48 characters among letters, digits and _ . : -")
    check_name(task_type, get_settings().schema_name)
    if backfill is not None and (isinstance(backfill, bool) or not isinstance(backfill, int)
                                 or not 1 <= backfill <= MAX_BACKFILL):
        raise ConfigurationError(f"schedule {name!r}: backfill must be an integer from 1 to {MAX_BACKFILL}")
    return parse(cron, tz, what=f"schedule {name!r}")


def load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plug-in must not take the others down
            _load_errors[ep.name] = f"cannot load task type {ep.name!r} from {ep.value}: {exc}"


def import_modules(modules: list[str]) -> None:
    """Import modules that register task types with @task (the worker's --import)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import {name!r}: {exc}") from None


def get_type(name: str) -> TaskType:
    if name not in _registry:
        load_entry_points()
    try:
        return _registry[name]
    except KeyError:
        if name in _load_errors:
            raise ConfigurationError(_load_errors[name]) from None
        known = ", ".join(sorted(_registry)) or "none"
        raise UnknownTaskType(f"unknown task type {name!r} (known: {known})") from None


def known_types() -> list[str]:
    load_entry_points()
    return sorted(_registry)


def unregister(name: str) -> None:
    """Forget a type (tests and plug-in reloads)."""
    _registry.pop(name, None)
    _declared.pop(name, None)
