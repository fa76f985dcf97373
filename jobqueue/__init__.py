"""jobq: a durable job queue whose broker is PostgreSQL itself. The tasks table is the queue.

The public API is the names below; everything else is internal and may change.

The names are imported on first use (PEP 562), so ``import jobqueue.<part>`` (the CLI, a handler
module) does not pay for both database drivers and the runtime: `jobq ls` starts in a fraction of the
time. ``from jobqueue import Client`` works as before.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backpressure import raise_for_backpressure, retry_after_seconds
    from .client.aio import AsyncClient
    from .client.sync import Client, cancel, enqueue, enqueue_many, get, list_tasks, retry
    from .client.wait import TaskEvent
    from .cron import Schedules
    from .db.connect import connect
    from .db.sqlfile import SQLFile
    from .errors import (
        Cancelled,
        ConfigurationError,
        DatabaseError,
        DatabaseUnavailable,
        DocumentError,
        DuplicateTask,
        Fail,
        InvalidPayload,
        InvalidTransition,
        JobqError,
        PayloadTooLarge,
        PermissionDenied,
        SchemaMissing,
        Snooze,
        TaskFailed,
        TaskNotFound,
        UnknownTaskType,
        WaitTimeout,
    )
    from .models import QueueState, Task, TaskSpec
    from .registry import declare, get_type, task
    from .runtime.context import Context, ParentOutcome
    from .runtime.listener import Listener
    from .settings import Settings, get_settings
    from .states import LIVE, TERMINAL, RunOn, Status
    from .tracing import traced

__version__ = "0.1.0"

_WHERE = {
    "AsyncClient": ".client.aio",
    "Cancelled": ".errors",
    "Client": ".client.sync",
    "ConfigurationError": ".errors",
    "Context": ".runtime.context",
    "DatabaseError": ".errors",
    "DatabaseUnavailable": ".errors",
    "DocumentError": ".errors",
    "DuplicateTask": ".errors",
    "Fail": ".errors",
    "InvalidPayload": ".errors",
    "InvalidTransition": ".errors",
    "JobqError": ".errors",
    "Listener": ".runtime.listener",
    "ParentOutcome": ".runtime.context",
    "PayloadTooLarge": ".errors",
    "PermissionDenied": ".errors",
    "QueueState": ".models",
    "SQLFile": ".db.sqlfile",
    "Schedules": ".cron",
    "SchemaMissing": ".errors",
    "Settings": ".settings",
    "Snooze": ".errors",
    "Task": ".models",
    "TaskEvent": ".client.wait",
    "TaskFailed": ".errors",
    "TaskNotFound": ".errors",
    "TaskSpec": ".models",
    "UnknownTaskType": ".errors",
    "WaitTimeout": ".errors",
    "LIVE": ".states",
    "TERMINAL": ".states",
    "RunOn": ".states",
    "Status": ".states",
    "cancel": ".client.sync",
    "connect": ".db.connect",
    "declare": ".registry",
    "enqueue": ".client.sync",
    "enqueue_many": ".client.sync",
    "get": ".client.sync",
    "get_settings": ".settings",
    "get_type": ".registry",
    "list_tasks": ".client.sync",
    "raise_for_backpressure": ".backpressure",
    "retry": ".client.sync",
    "retry_after_seconds": ".backpressure",
    "task": ".registry",
    "traced": ".tracing",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'jobqueue' has no attribute {name!r}")
    value = getattr(import_module(where, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "LIVE",
    "TERMINAL",
    "AsyncClient",
    "Cancelled",
    "Client",
    "ConfigurationError",
    "Context",
    "DatabaseError",
    "DatabaseUnavailable",
    "DocumentError",
    "DuplicateTask",
    "Fail",
    "InvalidPayload",
    "InvalidTransition",
    "JobqError",
    "Listener",
    "ParentOutcome",
    "PayloadTooLarge",
    "PermissionDenied",
    "QueueState",
    "RunOn",
    "SQLFile",
    "Schedules",
    "SchemaMissing",
    "Settings",
    "Snooze",
    "Status",
    "Task",
    "TaskEvent",
    "TaskFailed",
    "TaskNotFound",
    "TaskSpec",
    "UnknownTaskType",
    "WaitTimeout",
    "__version__",
    "cancel",
    "connect",
    "declare",
    "enqueue",
    "enqueue_many",
    "get",
    "get_settings",
    "get_type",
    "list_tasks",
    "raise_for_backpressure",
    "retry",
    "retry_after_seconds",
    "task",
    "traced",
]
