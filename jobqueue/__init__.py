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
    from .client.aio import AsyncClient
    from .client.sync import Client, TaskSpec, cancel, enqueue, enqueue_many, get, list_tasks, retry
    from .db.connect import connect
    from .db.sqlfile import SQLFile
    from .errors import (
        Cancelled,
        DatabaseUnavailable,
        DedupeConflict,
        DocumentError,
        Fail,
        InvalidPayload,
        JobqError,
        PermissionDenied,
        Snooze,
        TaskNotFound,
        UnknownTaskType,
    )
    from .models import Task
    from .registry import get_type, task
    from .runtime.context import Context
    from .settings import Settings, get_settings

__version__ = "0.1.0"

_WHERE = {
    "AsyncClient": ".client.aio",
    **dict.fromkeys(("Client", "TaskSpec", "cancel", "enqueue", "enqueue_many", "get", "list_tasks", "retry"),
                    ".client.sync"),
    **dict.fromkeys(("Cancelled", "DatabaseUnavailable", "DedupeConflict", "DocumentError", "Fail", "InvalidPayload",
                     "JobqError", "PermissionDenied", "Snooze", "TaskNotFound", "UnknownTaskType"), ".errors"),
    "Task": ".models",
    "task": ".registry",
    "get_type": ".registry",
    "connect": ".db.connect",
    "SQLFile": ".db.sqlfile",
    "Context": ".runtime.context",
    "Settings": ".settings",
    "get_settings": ".settings",
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
    "AsyncClient",
    "Cancelled",
    "Client",
    "Context",
    "DatabaseUnavailable",
    "DedupeConflict",
    "DocumentError",
    "Fail",
    "InvalidPayload",
    "JobqError",
    "PermissionDenied",
    "SQLFile",
    "Settings",
    "Snooze",
    "Task",
    "TaskNotFound",
    "TaskSpec",
    "UnknownTaskType",
    "__version__",
    "cancel",
    "connect",
    "enqueue",
    "enqueue_many",
    "get",
    "get_settings",
    "get_type",
    "list_tasks",
    "retry",
    "task",
]
