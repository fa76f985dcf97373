"""jobq: a durable job queue whose broker is PostgreSQL itself. The tasks table is the queue.

The public API is the names below; everything else is internal and may change.
"""

from .client.aio import AsyncClient
from .client.sync import Client, TaskSpec, cancel, enqueue, enqueue_many, get, list_tasks, retry
from .db.connect import connect
from .db.sqlfile import SQLFile
from .errors import (
    Cancelled,
    DatabaseUnavailable,
    DocumentError,
    Fail,
    InvalidPayload,
    JobqError,
    Snooze,
    TaskNotFound,
    UnknownTaskType,
)
from .models import Task
from .registry import get_type, task
from .runtime.context import Context
from .settings import Settings, get_settings

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Client",
    "Context",
    "DatabaseUnavailable",
    "DocumentError",
    "Fail",
    "InvalidPayload",
    "JobqError",
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
