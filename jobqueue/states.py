"""Names and the state machine shared by the migrations, the SQL and the docs.

A task moves through these states (Oban-style: every transition is one guarded UPDATE)::

    waiting ──(last parent done)──► queued ──(claim)──► running ──► done
       │                              ▲  │                 │  ├──► failed     (retries exhausted / non-retryable)
       │                              │  │                 │  └──► cancelled  (cancel requested while running)
       │                              │  └──(cancel)──► cancelled
       └──(a parent failed/cancelled)─┼──────────────► cancelled
                                      └─(retry with backoff, lease expired, released on shutdown, snoozed)

``done``, ``failed`` and ``cancelled`` are terminal; ``jobq retry`` moves a failed or cancelled task
back to ``queued`` as a new life (retry_count reset).
"""

from __future__ import annotations

import importlib.util
from enum import StrEnum
from pathlib import Path
from types import ModuleType


class Status(StrEnum):
    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The statuses of a task that may still run, and of one that never will again (`jobq retry` excepted).
# Tuples in the order of the state machine, so messages and SQL arrays built from them read the same.
LIVE: tuple[Status, ...] = (Status.WAITING, Status.QUEUED, Status.RUNNING)
TERMINAL: tuple[Status, ...] = (Status.DONE, Status.FAILED, Status.CANCELLED)


class Outcome(StrEnum):
    """How one attempt ended, as the executor reports it and the completer writes it.

    ``retry`` becomes ``failed`` in the database once the retries are spent; ``retry``, ``failed`` and
    ``snoozed`` become ``cancelled`` when a cancel was requested while the attempt ran.
    """

    DONE = "done"
    RETRY = "retry"  # an error: back to queued after a backoff while retries remain
    FAILED = "failed"  # non-retryable (Fail, a refused result or payload)
    SNOOZED = "snoozed"
    CANCELLED = "cancelled"
    RELEASED = "released"  # given back on shutdown, no retry spent


class RunOn(StrEnum):
    """When a task with parents (depends_on) runs: the callback kinds of Oban Pro's batches and Celery's chords.

    ``success``: once every parent is done; cancelled as soon as one fails or is cancelled (the default).
    ``always``: once every parent finished, whatever the outcome. ``failure``: once every parent finished
    and at least one failed or was cancelled; cancelled when all succeeded. ``ctx.parents()`` says how
    each parent ended.
    """

    SUCCESS = "success"
    ALWAYS = "always"
    FAILURE = "failure"


class CancelReason(StrEnum):
    """Why the runtime asked a handler to stop."""

    USER = "user"  # jobq cancel / Client.cancel
    TIMEOUT = "timeout"  # the soft timeout
    SHUTDOWN = "shutdown"  # the grace period ended
    LOST = "lost"  # the attempt is no longer ours (rescued, or re-claimed)

# pg_advisory_lock keys: arbitrary constants, namespaced by a fixed prefix so they are unlikely
# to collide with an application's own advisory locks.
MIGRATION_LOCK_KEY = 0x6A6F6271_0001  # "jobq" + 1
RESCUER_LOCK_KEY = 0x6A6F6271_0002
PRUNER_LOCK_KEY = 0x6A6F6271_0003


def type_channel(schema: str, task_type: str) -> str:
    """The NOTIFY channel that wakes workers of one task type."""
    return f"{schema}.{task_type}"


def cancel_channel(schema: str) -> str:
    return f"{schema}.cancel"


def progress_channel(schema: str) -> str:
    """Progress of running tasks and the end of document tasks: ``<id>,<doc_id or 0>,<progress>``."""
    return f"{schema}.progress"


def finished_channel(schema: str) -> str:
    """Tasks that reached a final state (the completer and the rescuer): ``<id>,<id>,...``."""
    return f"{schema}.finished"


def migration_schema() -> str:
    """The target schema inside a running alembic migration (set by migrations/env.py)."""
    from alembic import context

    schema = context.config.attributes.get("schema")
    if not isinstance(schema, str):
        raise RuntimeError("jobq migrations must run through migrations/env.py")
    return schema


def sibling_revision(filename: str) -> ModuleType:
    """Another revision file of migrations/versions, loaded as a module: a later revision re-issues
    an earlier one's view text (one copy of the views) rather than repeating it."""
    from alembic import context

    versions = Path(context.config.get_main_option("script_location") or "") / "versions"
    spec = importlib.util.spec_from_file_location(f"jobq_migration_{filename.split('_')[0]}", versions / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
