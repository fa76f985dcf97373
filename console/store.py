"""Every read and write the console makes, on one psycopg connection per server thread.

Task reads and changes go through :class:`jobqueue.Client` (its list is the keyset-paginated SQL
filter the CLI uses), document uploads through jobq_workers' enqueue; the rest is ``sql/console.sql``,
which reads the observation views `jobq top` reads for the overview, workers and failures (each page
only the views it shows).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
from psycopg.rows import dict_row

from jobqueue import (
    Client,
    DatabaseError,
    DatabaseUnavailable,
    InvalidPayload,
    JobqError,
    PayloadTooLarge,
    PermissionDenied,
    QueueState,
    Settings,
    Task,
    TaskNotFound,
    UnknownTaskType,
    connect,
    get_type,
)

from .queries import ConsoleSQL

Row = dict[str, Any]
# Characters of a chunk or summary shown in a list (the page for one chunk shows it all).
CHUNK_PREVIEW = 400
# Stopped workers stay on the workers page this long (as in `jobq top`), so a crash remains visible.
STOPPED_VISIBLE_SECONDS = 3600
# (type, error) groups the failures page lists.
FAILURE_GROUPS = 200
# Flow-controlled keys the overview lists (held back and busiest first).
FLOW_KEYS = 50
# The queue controls: each is the Client method of that name (cap also takes the number).
QUEUE_ACTIONS = ("pause", "resume", "cap", "uncap")


@dataclass(frozen=True)
class Access:
    """What this console's database login may do and read, asked once when the server starts."""

    read_only: bool = True
    control: bool = False  # pause, resume, cap, uncap (the schema owner)
    workers: bool = False  # the worker_health view (a producer may not: the fleet's hosts and pids)
    all_chunks: bool = False  # every document's chunks; without it only its own, through own_chunks


@dataclass(frozen=True)
class Upload:
    """One file of a multipart upload, as the web framework hands it over."""

    filename: str
    file: BinaryIO


class Store:
    """The console's database access: one autocommit connection per server thread, passed to the
    Client's calls too, and all closed when the server stops."""

    def __init__(self, url: str | None, settings: Settings) -> None:
        self.settings = settings
        self.client = Client(url, settings=settings)
        self.q = ConsoleSQL.load(settings.schema_name)
        self._local = threading.local()
        # Every connection opened, whichever server thread holds it, so close() ends them all.
        self._opened: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self.rights = Access()

    @property
    def url(self) -> str:
        return self.client.url

    def _conn(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = connect(self.url, autocommit=True)
            self._local.conn = conn
            with self._lock:
                self._opened = [c for c in self._opened if not c.closed]
                self._opened.append(conn)
        return conn

    def rows(self, statement: str, *params: Any) -> list[Row]:
        """One statement's rows; the database's refusals as the library's errors (so as HTTP statuses)."""
        try:
            with psycopg.RawCursor(self._conn(), row_factory=dict_row) as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else []
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction) as exc:
            raise PermissionDenied(f"the database refused: {first_line(exc)}") from None
        except psycopg.errors.DataError as exc:
            raise InvalidPayload(first_line(exc)) from None
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(first_line(exc)) from None
        except psycopg.Error as exc:
            raise DatabaseError(first_line(exc)) from None

    def one(self, statement: str, *params: Any) -> Row | None:
        found = self.rows(statement, *params)
        return found[0] if found else None

    def close(self) -> None:
        """Close every thread's connection (the server is stopping; no request runs any more)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()
        self.client.close()

    # -- reads

    def access(self) -> Access:
        """This login's rights; later reads choose their statements by them."""
        row = self.one(self.q.access) or {}
        self.rights = Access(**{f.name: bool(row.get(f.name, f.default)) for f in fields(Access)})
        return self.rights

    def overview(self) -> list[Row]:
        return self.rows(self.q.overview)

    def flow_control(self) -> list[Row]:
        return self.rows(self.q.flow_control, FLOW_KEYS)

    def queues(self) -> list[QueueState]:
        return self.client.queues(connection=self._conn())

    def tasks(self, *, status: Sequence[str] | None = None, type: str | None = None, owner: str | None = None,
              label: str | None = None, doc_id: int | None = None, error: str | None = None,
              before_id: int | None = None, limit: int = 50) -> list[Task]:
        return self.client.list(status=status or None, type=type, owner=owner, label=label, doc_id=doc_id,
                                error=error, before_id=before_id, limit=limit, connection=self._conn())

    def task(self, task_id: int) -> Task:
        return self.client.get(task_id, connection=self._conn())

    def task_detail(self, task_id: int) -> dict[str, Any]:
        t = self.task(task_id)
        ahead = self.one(self.q.queue_position, task_id) if t.status == "queued" else None
        return {
            "task": t,
            "parents": self.rows(self.q.parents, list(t.depends_on or [])) if t.depends_on else [],
            "children": self.rows(self.q.children, task_id, t.doc_id),
            "ahead": ahead["ahead"] if ahead else None,
        }

    def documents(self, *, status: str | None = None, owner: str | None = None, before_id: int | None = None,
                  limit: int = 50) -> list[Row]:
        return self.rows(self.q.documents, status, owner, before_id, limit)

    def document(self, doc_id: int) -> Row:
        row = self.one(self.q.document, doc_id)
        if row is None:
            raise TaskNotFound(f"no document with id {doc_id}")
        return row

    def document_detail(self, doc_id: int, after: tuple[int, int, int] | None, limit: int) -> dict[str, Any]:
        """The document, its ranges and, unless `limit` is 0 (the API's document), a page of its chunks and
        its summary tree: all of them, or for a login without SELECT on chunks its own documents' only."""
        doc = self.document(doc_id)
        detail = {"doc": doc, "tasks": self.rows(self.q.document_tasks, doc_id), "chunks": [], "summaries": []}
        if limit:
            all_chunks = self.rights.all_chunks
            key = after or (None, None, None)
            detail["chunks"] = self.rows(self.q.document_chunks if all_chunks else self.q.own_document_chunks,
                                         doc_id, *key, limit, CHUNK_PREVIEW)
            summaries = self.q.document_summaries if all_chunks else self.q.own_document_summaries
            detail["summaries"] = summary_tree(self.rows(summaries, doc_id, CHUNK_PREVIEW))
        return detail

    def workers(self) -> list[Row] | None:
        """None for a login that may not read worker_health (the page says so and lists running tasks)."""
        return self.rows(self.q.workers, STOPPED_VISIBLE_SECONDS) if self.rights.workers else None

    def failures(self) -> list[Row]:
        return self.rows(self.q.failures, FAILURE_GROUPS)

    def running(self) -> dict[str, list[Row]]:
        by_worker: dict[str, list[Row]] = {}
        for r in self.rows(self.q.running_tasks):
            by_worker.setdefault(r["worker_id"] or "", []).append(r)
        return by_worker

    def live(self, task_ids: Sequence[int], doc_ids: Sequence[int]) -> list[Row]:
        """The rows a live stream sends, each tagged with its kind."""
        out = [{"kind": "task", **r} for r in self.rows(self.q.live_tasks, list(task_ids))] if task_ids else []
        if doc_ids:
            out += [{"kind": "document", **r} for r in self.rows(self.q.live_documents, list(doc_ids))]
        return out

    # -- changes

    def cancel(self, task_id: int | None = None, doc_id: int | None = None) -> dict[int, str]:
        return self.client.cancel(task_id, doc_id=doc_id, reason="Task stopped from the web console.",
                                  connection=self._conn())

    def retry(self, task_id: int | None = None, doc_id: int | None = None) -> dict[int, str]:
        return self.client.retry(task_id, doc_id=doc_id, connection=self._conn())

    def set_priority(self, priority: int, task_id: int | None = None, doc_id: int | None = None) -> list[int]:
        """Through the client's prioritize (a SECURITY DEFINER function), so a producer login may push
        its own tasks, not only the schema owner."""
        if task_id is None and doc_id is None:
            raise InvalidPayload("name a task or a document")
        if doc_id is not None:
            self.document(doc_id)  # 404 for an unknown document
        return self.client.prioritize(task_id, priority=priority, doc_id=doc_id, connection=self._conn())

    # -- the selection a list's filters describe (refused without any filter: never every task)

    def cancel_where(self, **selector: Any) -> dict[int, str]:
        return self.client.cancel_where(**selector, reason="Task stopped from the web console.",
                                        connection=self._conn())

    def retry_where(self, **selector: Any) -> dict[int, str]:
        return self.client.retry_where(**selector, connection=self._conn())

    def prioritize_where(self, priority: int, **selector: Any) -> list[int]:
        return self.client.prioritize(priority=priority, **selector, connection=self._conn())

    # -- queue control (the schema owner only: docs/roles.md)

    def control_queue(self, action: str, type: str, max_running: int | None = None) -> QueueState:
        """Pause, resume, cap or uncap `type`; its state afterwards. A role that may not write the
        queues table gets a PermissionDenied that says who may."""
        if action not in QUEUE_ACTIONS:
            raise InvalidPayload(f"no queue action {action!r}: one of {', '.join(QUEUE_ACTIONS)}")
        conn = self._conn()
        try:
            if action == "cap":
                if max_running is None:
                    raise InvalidPayload("cap needs max_running")
                self.client.cap(type, max_running, connection=conn)
            else:
                getattr(self.client, action)(type, connection=conn)
        except PermissionDenied as exc:
            raise PermissionDenied(f"only the schema owner may {action} a queue; this console's database role "
                                   f"may not (docs/roles.md): {exc}") from None
        return next(q for q in self.queues() if q.type == type)

    def enqueue(self, type: str, payload: Any = None, **options: Any) -> int:
        """The library accepts a type its process never registered (a producer without the handlers);
        a form or an API call has no --import, so here a type must be registered in this server or known
        to the database (a queue row, live tasks or a live worker serving it): a typo is a 422, not a
        task no worker will ever take."""
        if not self._known(type):
            raise UnknownTaskType(f"unknown task type {type!r}: this server does not register it and no "
                                  "worker, queue or live task has it")
        return self.client.enqueue(type, payload, connection=self._conn(), **options)

    def _known(self, type: str) -> bool:
        try:
            get_type(type)
            return True
        except JobqError:
            return any(q.type == type for q in self.queues())

    def upload(self, files: Sequence[Upload], **options: Any) -> Any:
        """Store the uploads under their own names in a temporary folder and enqueue them as one batch
        through jobq_workers' enqueue (the same checks and per-file errors as `jobq enqueue FILE`)."""
        from jobq_workers.documents import enqueue_files

        limit = self.settings.max_document_bytes
        folder = Path(tempfile.mkdtemp(prefix="jobq-upload-"))
        try:
            paths = []
            for i, f in enumerate(files):
                name = safe_name(f.filename)
                target = folder / str(i)
                target.mkdir()
                path = target / name
                with path.open("wb") as out:
                    copied = 0
                    while chunk := f.file.read(1 << 20):
                        copied += len(chunk)
                        if copied > limit:
                            raise PayloadTooLarge(f"{name} is over the limit of {limit} bytes "
                                                  "(JOBQ_MAX_DOCUMENT_BYTES)")
                        out.write(chunk)
                paths.append(str(path))
            return enqueue_files(paths, url=self.url, settings=self.settings, **options)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def safe_name(filename: str | None) -> str:
    """The last part of an uploaded file's name: never a path, never empty."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].replace("\x00", "").strip()
    if name in ("", ".", ".."):
        raise InvalidPayload("an uploaded file has no name")
    return name[:200]


def summary_tree(rows: list[Row]) -> list[Row]:
    """Summaries nested under their parents (top level first); each row gets a ``children`` list."""
    by_id = {r["id"]: {**r, "children": []} for r in rows}
    roots: list[Row] = []
    for r in by_id.values():
        parent = by_id.get(r["parent_id"])
        (parent["children"] if parent else roots).append(r)
    return roots
