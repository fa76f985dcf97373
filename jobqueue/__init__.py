"""jobq: a durable job queue whose broker is PostgreSQL itself. The tasks table is the queue.

The public API is the names below; everything else is internal and may change.
"""

from .client.aio import AsyncClient
from .client.sync import Client, TaskSpec, cancel, enqueue, enqueue_many, get, list_tasks, retry
from .errors import (
    Cancelled,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    DuplicateTask,
    Fail,
    InvalidPayload,
    InvalidTransition,
    JobqError,
    PermissionDenied,
    SchemaMissing,
    Snooze,
    TaskNotFound,
    UnknownTaskType,
)
from .models import Task
from .registry import task
from .runtime.context import Context
from .settings import Settings, get_settings

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Client",
    "ConfigurationError",
    "Context",
    "DatabaseError",
    "DatabaseUnavailable",
    "DuplicateTask",
    "Fail",
    "InvalidPayload",
    "InvalidTransition",
    "JobqError",
    "PermissionDenied",
    "SchemaMissing",
    "Settings",
    "Snooze",
    "Task",
    "TaskNotFound",
    "TaskSpec",
    "UnknownTaskType",
    "__version__",
    "cancel",
    "enqueue",
    "enqueue_many",
    "get",
    "get_settings",
    "list_tasks",
    "retry",
    "task",
]
