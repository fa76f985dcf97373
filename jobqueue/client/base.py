"""What the sync and async clients share: settings, statements, URL, and the cancel report."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jobqueue.db.connect import normalize, resolve_url
from jobqueue.db.queries import ClientSQL
from jobqueue.errors import DatabaseError, InvalidTransition, PermissionDenied, TaskNotFound
from jobqueue.settings import Settings, get_settings
from jobqueue.states import Status

# How often a batch's rows that lost a dedupe race are re-run before giving up (each run resolves
# every row whose rival committed before it started; a new rival per run is practically impossible).
RACE_RETRIES = 5


class ClientBase:
    """Settings, the statements for the configured schema, and the database URL (resolved lazily)."""

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._url = normalize(url) if url else None
        self.q = ClientSQL.load(self.settings.schema_name)

    @property
    def url(self) -> str:
        """The configured URL, else the running embedded server's (a library client never starts one)."""
        if self._url is None:
            self._url = resolve_url(self.settings)
        return self._url


def all_ids(ids: Sequence[int | None], type: str) -> list[int]:
    """enqueue_many's ids, or its error when some rows kept losing dedupe races."""
    if None in ids:
        raise DatabaseError(f"enqueue_many of {type!r} kept losing dedupe races")
    return [i for i in ids if i is not None]


def id_statuses(rows: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """{id: status} from the cancel statement (``cancelled``, or ``running`` while the worker stops it)
    or the retry statement (``queued``, or ``waiting`` for a parent that is not done)."""
    return {int(r["id"]): str(r["status"]) for r in rows}


def status_of(task_id: int, row: Mapping[str, Any] | None) -> str:
    if row is None:
        raise TaskNotFound(f"no task with id {task_id}")
    return str(row["status"])


def not_retryable(task_id: int | None, row: Mapping[str, Any] | None, doc_id: int | None) -> InvalidTransition:
    """Why a retry changed nothing: the named task is not failed or cancelled, or the document has none."""
    if task_id is None:
        return InvalidTransition(f"document {doc_id} has no failed or cancelled task to retry")
    if row is not None and row.get("superseded_at") is not None:
        return InvalidTransition(f"task {task_id} belongs to an earlier run of document {row['doc_id']}, replaced "
                                 "when it was enqueued again; retry the document's current tasks instead")
    return InvalidTransition(
        f"task {task_id} is {status_of(task_id, row)}; only failed or cancelled tasks can be retried")


def not_prioritized(task_id: int, row: Mapping[str, Any] | None) -> TaskNotFound | InvalidTransition | PermissionDenied:
    """Why a task named by id kept its priority: missing, no longer queued or waiting, or another role's."""
    status = status_of(task_id, row)
    if status in (Status.QUEUED, Status.WAITING):
        return PermissionDenied(f"task {task_id} was enqueued by another role; only its own tasks can be reprioritised")
    return InvalidTransition(f"task {task_id} is {status}; only queued or waiting tasks can be reprioritised")
