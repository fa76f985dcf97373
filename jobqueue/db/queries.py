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
    reserve_ids: str
    copy_tasks: str
    copy_tasks_unlabelled: str
    copy_tasks_bare: str
    lock_parents: str
    cancel: str
    retry: str
    cancel_where: str
    retry_where: str
    prioritize: str
    set_queue: str
    queues: str
    get: str
    list: str


class RuntimeSQL(SQLFile, package=PACKAGE, filename="sql/runtime.sql"):
    """What a worker runs for its claimed tasks (jobqueue/runtime/)."""

    claim: str
    running_count: str
    cap_lock: str
    capped_types: str
    next_wake: str
    # Flow control (runtime/flow.py): fair claims, per-key limits, rate limits.
    claim_flow: str
    flow_wait: str
    flow_declared: str
    declare_flow: str
    finish_many: str
    complete_many: str
    release_dependents: str
    parent_outcomes: str
    cancel_dependents: str
    progress_many: str
    heartbeat: str
    confirm_cancel: str
    worker_stopped: str


class MaintenanceSQL(SQLFile, package=PACKAGE, filename="sql/maintenance.sql"):
    """The maintenance services (jobqueue/runtime/maintenance/)."""

    rescue: str
    prune_lock: str
    prune_lock_timeout: str
    prune_delete: str
    prune_count: str
    prune_workers: str


class CronSQL(SQLFile, package=PACKAGE, filename="sql/cron.sql"):
    """Cron schedules: the scheduler (jobqueue/runtime/maintenance/scheduler.py) and `jobq cron` (jobqueue/cron.py)."""

    db_now: str
    list_schedules: str
    get_schedule: str
    add_schedule: str
    pause_schedule: str
    remove_schedule: str
    declare_schedules: str
    due_schedules: str
    fire_ticks: str


class AdminSQL(SQLFile, package=PACKAGE, filename="sql/admin.sql"):
    """`jobq roles` (jobqueue/admin/roles.py): each statement returns the DDL to run."""

    role_grants: str
    create_role: str
    reset_role: str
    grant_all_tables: str
    grant_tables: str
    grant_columns: str
    grant_functions: str
    read_only: str
    login_password: str


class ObserveSQL(SQLFile, package=PACKAGE, filename="sql/observe.sql"):
    """The snapshot of the observation views (jobqueue/observe/)."""

    snapshot_begin: str
    now: str
    queue_depth: str
    queue_state: str
    throughput: str
    latency: str
    workers: str
    failures: str
    flow_control: str
    schedules: str


class SchemaSQL(SQLFile, package=PACKAGE, filename="sql/schema.sql"):
    """The schema check that needs no alembic (jobqueue/admin/revision.py)."""

    tables: str
    revision: str


class ServerSQL(SQLFile, package=PACKAGE, filename="sql/server.sql"):
    """About the server and its connections, not jobq's tables: ``ServerSQL.load("")``."""

    ping: str
    database_exists: str
    create_database: str


class WaitSQL(SQLFile, package=PACKAGE, filename="sql/wait.sql"):
    """What waiters run (jobqueue/client/wait.py)."""

    watch: str
    probe: str


class FixtureSQL(SQLFile, package=PACKAGE, filename="sql/testing.sql"):
    """What the pytest plugin runs on the test server (jobqueue/testing.py): ``FixtureSQL.load("")``."""

    clone_database: str
    drop_database: str
    search_path: str
    not_durable: str
    no_sync_commit: str
    reload: str
