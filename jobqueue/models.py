"""A task as producers describe it (TaskSpec) and as it is read back (Task, columns documented in README.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class TaskSpec:
    """One task of an ``enqueue_many`` batch (fields as in :meth:`jobqueue.Client.enqueue`)."""

    payload: Any = None
    priority: int | None = None
    run_at: datetime | None = None
    delay: float | timedelta | None = None
    max_retries: int | None = None
    dedupe_key: str | None = None
    doc_id: int | None = None
    batch_id: int | None = None
    from_page: int | None = None
    to_page: int | None = None
    owner: str | None = None
    digest: str | None = None


class Task(BaseModel):
    """One row of the tasks table, read by column name."""


    model_config = ConfigDict(frozen=True)

    id: int
    type: str
    priority: int
    status: str
    payload: Any
    run_at: datetime
    doc_id: int | None = None
    batch_id: int | None = None
    from_page: int | None = None
    to_page: int | None = None
    owner: str | None = None
    labels: list[str] = []
    dedupe_key: str | None = None
    digest: str | None = None
    depends_on: list[int] | None = None
    pending_deps: int = 0
    progress: float
    progress_msg: str
    retry_count: int
    max_retries: int
    result: Any = None
    last_error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    process_duration: float | None = None
    worker_id: str | None = None
    attempt: int
    lease_expires_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    run_on: str = "success"  # with depends_on: success, always or failure (jobqueue.states.RunOn)
    schedule: str | None = None  # the cron schedule that enqueued it, and for which tick
    tick: datetime | None = None


class QueueState(BaseModel):
    """One task type's queue as ``Client.queues()`` reads it (the view queue_state, migration 0008)."""

    model_config = ConfigDict(frozen=True)

    type: str
    paused: bool
    max_running: int | None
    queued: int
    runnable: int
    waiting: int
    running: int
    workers: int  # live workers serving this type; 0 with queued tasks is a typo or a missing worker
    updated_at: datetime | None

    @property
    def served(self) -> bool:
        return self.workers > 0
