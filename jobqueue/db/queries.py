"""The statement files of the queue library and the names each one defines.

Every statement the library runs lives in ``jobqueue/db/sql/*.sql``; the classes below declare them.
A name declared here but absent from its file (or the reverse) fails at import; a misspelt use fails
under mypy. Parts take the file they need for their schema: ``RuntimeSQL.load(settings.schema_name)``.
"""

from __future__ import annotations

from jobqueue.db.sqlfile import SQLFile

PACKAGE = "jobqueue.db"


class ClientSQL(SQLFile, package=PACKAGE, filename="sql/client.sql"):
    """What producers run (jobqueue/client/)."""

    enqueue: str
    enqueue_many: str
    lock_parents: str
    cancel: str
    retry: str
    get: str


class RuntimeSQL(SQLFile, package=PACKAGE, filename="sql/runtime.sql"):
    """What a worker runs for its claimed tasks (jobqueue/runtime/)."""

    claim: str
    running_count: str
    cap_lock: str
    capped_types: str
    next_wake: str
    complete_many: str
    release_dependents: str
    cancel_dependents: str
    fail: str
    snooze: str
    mark_cancelled: str
    progress_many: str
    heartbeat: str
    confirm_cancel: str
    worker_stopped: str
    release: str


class MaintenanceSQL(SQLFile, package=PACKAGE, filename="sql/maintenance.sql"):
    """The maintenance services (jobqueue/runtime/maintenance/)."""

    rescue: str
    prune_lock: str
    prune_lock_timeout: str
    prune_delete: str
    prune_count: str
    prune_workers: str
