"""The producer API: enqueue (one, many, with dependencies), get, list, cancel, retry.

Sync on psycopg, async on asyncpg. Given the caller's own connection (psycopg, asyncpg, or a
SQLAlchemy Connection/Session on either driver) every write happens in the caller's transaction:
the task exists, and wakes workers, only when the caller commits (NOTIFY is transactional).
Everything a user can get wrong is checked before the first write, so a bad call writes nothing.
"""

from __future__ import annotations

import builtins
import json
import math
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from pydantic import BaseModel, ValidationError

from jobqueue import registry
from jobqueue.db.connect import connect, resolve_url
from jobqueue.db.queries import ClientSQL
from jobqueue.errors import (
    DedupeConflict,
    InvalidPayload,
    InvalidTransition,
    JobqError,
    PermissionDenied,
    TaskNotFound,
)
from jobqueue.models import Task
from jobqueue.settings import Settings, get_settings

INT32 = 2**31 - 1
MAX_DEPTH = 64
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


# ---------------------------------------------------------------- validation (shared by both APIs)


def _text(field: str, value: str | None, *, limit: int = 1000) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidPayload(f"{field} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidPayload(f"{field} contains a NUL character, which PostgreSQL text cannot store")
    if len(value) > limit:
        raise InvalidPayload(f"{field} is longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPayload(f"{field} is not valid Unicode (lone surrogate)") from None
    return value


def _int32(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"{field} must be an integer, got {type(value).__name__}")
    if not -INT32 - 1 <= value <= INT32:
        raise InvalidPayload(f"{field} {value} does not fit in 32 bits")
    return value


def _depth(value: Any, limit: int = MAX_DEPTH) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                raise InvalidPayload(f"payload is nested deeper than {limit} levels")
            if isinstance(v, dict) and not all(isinstance(k, str) for k in v):
                # json.dumps would turn 1, 1.5, True, None into "1", "1.5", "true", "null": get() would
                # return a different object than the one enqueued.
                bad = next(k for k in v if not isinstance(k, str))
                raise InvalidPayload(f"payload object keys must be strings, got {type(bad).__name__} {bad!r}")
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))


_SCALARS = (str, int, float, bool, type(None))


def encode_payload(task_type: str, payload: Any, settings: Settings) -> str:
    """Validate against the type's payload model (if any) and encode as JSON text for jsonb."""
    return _encode(registry.get_type(task_type), payload, settings)


def _encode(spec: registry.TaskType, payload: Any, settings: Settings) -> str:
    task_type = spec.name
    if spec.payload is not None:
        try:
            model = payload if isinstance(payload, spec.payload) else spec.payload.model_validate(payload)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "payload"
            raise InvalidPayload(f"invalid payload for {task_type!r}: {where}: {err['msg']}") from None
        payload = model.model_dump(mode="json")
    elif isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    if payload is None:
        payload = {}
    # A flat object of scalars (the common payload) cannot be too deep; skip the walk.
    if not (isinstance(payload, dict) and all(type(k) is str and isinstance(v, _SCALARS) for k, v in payload.items())):
        _depth(payload)
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"payload is not JSON-serialisable: {exc}") from None
    if _JSON_NUL.search(text):  # an escaped NUL, not a literal backslash followed by "u0000"
        raise InvalidPayload("payload contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidPayload("payload contains invalid Unicode (a lone surrogate)") from None
    if size > settings.max_payload_bytes:
        raise InvalidPayload(f"payload is {size} bytes, over the limit of {settings.max_payload_bytes}")
    return text


def _run_at(run_at: datetime | None, delay: float | timedelta | None) -> datetime | None:
    if run_at is not None and delay is not None:
        raise InvalidPayload("give run_at or delay, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if not math.isfinite(seconds):
            raise InvalidPayload("delay must be a finite number of seconds")
        try:
            return datetime.now(UTC) + timedelta(seconds=seconds)
        except OverflowError:
            raise InvalidPayload(f"delay of {seconds:g}s is out of range") from None
    if run_at is not None and run_at.tzinfo is None:
        return run_at.replace(tzinfo=UTC)  # naive times are taken as UTC
    if run_at is not None:
        try:  # 0001-01-01 00:00+05 is year 0 in UTC: PostgreSQL stores it, but no client can read it back
            return run_at.astimezone(UTC)
        except OverflowError:
            raise InvalidPayload(f"run_at {run_at.isoformat()} is outside years 1-9999 in UTC") from None
    return run_at


@dataclass(frozen=True)
class TaskSpec:
    """One task of an ``enqueue_many`` batch (fields as in :func:`enqueue`)."""

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


def _row(task_type: str, spec: TaskSpec, settings: Settings) -> tuple[Any, ...]:
    t = registry.get_type(task_type)
    return (
        task_type,
        _int32("priority", spec.priority if spec.priority is not None else t.priority),
        encode_payload(task_type, spec.payload, settings),
        _run_at(spec.run_at, spec.delay),
        _int32("max_retries", _max_retries(t, spec.max_retries, settings)),
        _text("dedupe_key", spec.dedupe_key),
        spec.doc_id,
        spec.batch_id,
        _int32("from_page", spec.from_page),
        _int32("to_page", spec.to_page),
        _text("owner", spec.owner, limit=200),
        _text("digest", spec.digest, limit=200),
    )


def rows_for(task_type: str, items: Iterable[Any], settings: Settings) -> list[tuple[Any, ...]]:
    """Rows of an enqueue_many batch: a bare payload takes the type's defaults, computed once."""
    t = registry.get_type(task_type)
    priority = _int32("priority", t.priority)
    retries = _max_retries(t, None, settings)
    rows: list[tuple[Any, ...]] = []
    for item in items:
        if isinstance(item, TaskSpec):
            rows.append(_row(task_type, item, settings))
        else:
            rows.append((task_type, priority, _encode(t, item, settings), None, retries,
                         None, None, None, None, None, None, None))
    return rows


def _max_retries(t: registry.TaskType, value: int | None, settings: Settings) -> int:
    v = value if value is not None else (t.max_retries if t.max_retries is not None else settings.max_retries)
    if v < 0:
        raise InvalidPayload("max_retries must be >= 0")
    return v


def _labels(labels: Sequence[str] | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise InvalidPayload("labels must be a list of strings")
    return [_text("label", v, limit=200) or "" for v in labels]


def _stamp(msg: str) -> str:
    return f"{datetime.now().strftime('%H:%M:%S')} {msg}"


def _plan_dependencies(parents: Sequence[tuple[int, str]], wanted: Sequence[int]) -> tuple[str, int, str]:
    """Status, pending count and log line of a new task from its parents' states."""
    found = {pid: status for pid, status in parents}
    missing = [p for p in wanted if p not in found]
    if missing:
        raise TaskNotFound(f"depends_on names unknown task(s): {', '.join(map(str, missing))}")
    dead = [p for p, s in found.items() if s in ("failed", "cancelled")]
    if dead:
        return "cancelled", 0, _stamp(f"[Canceled] parent task {dead[0]} is {found[dead[0]]}")
    pending = sum(1 for s in found.values() if s != "done")
    return ("waiting" if pending else "queued"), pending, ""


# ---------------------------------------------------------------- connections


def psycopg_connection(conn: Any) -> psycopg.Connection[Any] | None:
    """The psycopg connection behind a psycopg / SQLAlchemy Connection / Session, else None."""
    if isinstance(conn, psycopg.Connection):
        return conn
    try:
        from sqlalchemy.engine import Connection as SAConnection
        from sqlalchemy.orm import Session
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        return None
    if isinstance(conn, Session):
        conn = conn.connection()
    if isinstance(conn, SAConnection):
        raw = conn.connection.driver_connection
        if isinstance(raw, psycopg.Connection):
            return raw
        raise JobqError("SQLAlchemy connections must use the psycopg driver (postgresql+psycopg://)")
    return None


class Client:
    """Sync producer on psycopg. One connection per thread, reused between calls."""

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._url = url
        self.q = ClientSQL.load(self.settings.schema_name)
        self._local = threading.local()

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = resolve_url(self.settings)
        return self._url

    def _own(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = connect(self.url, autocommit=True)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self, connection: Any) -> tuple[psycopg.Connection[Any], bool]:
        if connection is None:
            return self._own(), True
        conn = psycopg_connection(connection)
        if conn is None:
            raise JobqError(f"unsupported connection type {type(connection).__name__} for the sync API")
        return conn, False

    def _fetch(self, connection: Any, sql: str, params: Sequence[Any]) -> builtins.list[tuple[Any, ...]]:
        conn, _ = self._conn(connection)
        try:
            # Our own connection is in autocommit: one statement is its own transaction (no BEGIN/COMMIT
            # round trips); callers that need several statements wrap them in conn.transaction().
            with psycopg.RawCursor(conn) as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        except (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded,
                psycopg.errors.CheckViolation, psycopg.errors.ForeignKeyViolation) as exc:
            raise _rejected(exc) from None

    # -- enqueue

    def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        max_retries: int | None = None,
        dedupe_key: str | None = None,
        doc_id: int | None = None,
        batch_id: int | None = None,
        from_page: int | None = None,
        to_page: int | None = None,
        owner: str | None = None,
        labels: Sequence[str] | None = None,
        digest: str | None = None,
        depends_on: Sequence[int] | None = None,
        connection: Any = None,
    ) -> int:
        """Enqueue one task and return its id (the live task's id when `dedupe_key` collides)."""
        spec = TaskSpec(payload, priority, run_at, delay, max_retries, dedupe_key, doc_id, batch_id,
                        from_page, to_page, owner, digest)
        row = _row(type, spec, self.settings)
        lab = _labels(labels)
        deps = sorted(set(depends_on)) if depends_on else None
        conn, own = self._conn(connection)
        if own and deps:
            with conn.transaction():
                return self._enqueue_in(conn, row, lab, deps)
        return self._enqueue_in(conn, row, lab, deps)

    def _enqueue_in(self, conn: psycopg.Connection[Any], row: tuple[Any, ...], labels: builtins.list[str] | None,
                    deps: builtins.list[int] | None) -> int:
        status, pending, line = "queued", 0, ""
        if deps:
            parents = self._fetch(conn, self.q.lock_parents, (deps,))
            status, pending, line = _plan_dependencies([(r[0], r[1]) for r in parents], deps)
        params = (*row[:11], labels, row[11], status, deps, pending, line)
        rows = self._fetch(conn, self.q.enqueue, params)
        if not rows:  # the live duplicate finished between the conflict and our look-up: try again
            rows = self._fetch(conn, self.q.enqueue, params)
        return int(rows[0][0])

    def enqueue_many(
        self,
        type: str,
        items: Iterable[Any],
        *,
        labels: Sequence[str] | None = None,
        connection: Any = None,
    ) -> builtins.list[int]:
        """Enqueue many tasks of one type in one round trip and return their ids in order.

        Items are payloads or :class:`TaskSpec`. Batches without dedupe keys go through COPY.
        """
        rows = rows_for(type, items, self.settings)
        lab = _labels(labels)
        if not rows:
            return []
        conn, own = self._conn(connection)
        if own:
            with conn.transaction():
                return self._many_in(conn, rows, lab)
        return self._many_in(conn, rows, lab)

    def _many_in(self, conn: psycopg.Connection[Any], rows: builtins.list[tuple[Any, ...]],
                 labels: builtins.list[str] | None) -> builtins.list[int]:
        if any(r[5] is not None for r in rows):
            cols = list(zip(*rows, strict=True))
            out = self._fetch(conn, self.q.enqueue_many, (*[list(c) for c in cols], labels))
            return [int(r[1]) for r in out]
        ids = [r[0] for r in conn.execute(
            f"SELECT nextval('{self.settings.schema_name}.tasks_id_seq') FROM generate_series(1, %s)",
            (len(rows),),
        ).fetchall()]
        now = datetime.now(UTC)
        copy_sql = (
            f"COPY {self.settings.schema_name}.tasks (id, type, priority, payload, run_at, max_retries, "
            "dedupe_key, doc_id, batch_id, from_page, to_page, owner, digest, labels) FROM STDIN"
        )
        try:
            with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                for i, r in zip(ids, rows, strict=True):
                    copy.write_row((i, r[0], r[1], r[2], r[3] or now, *r[4:], labels or []))
        except (psycopg.errors.DataError, psycopg.errors.CheckViolation,
                psycopg.errors.ForeignKeyViolation) as exc:
            raise _rejected(exc) from None
        return [int(i) for i in ids]

    # -- read

    def get(self, task_id: int, *, connection: Any = None) -> Task:
        conn, _ = self._conn(connection)
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            cur.execute(f"SELECT * FROM {self.settings.schema_name}.tasks WHERE id = %s", (task_id,))
            row = cur.fetchone()
        if row is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return Task.model_validate(row)

    def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        type: str | Sequence[str] | None = None,
        owner: str | None = None,
        doc_id: int | None = None,
        label: str | None = None,
        limit: int = 50,
        connection: Any = None,
    ) -> builtins.list[Task]:
        """Newest first, filtered; every filter is optional."""
        where, params = _filters(status, type, owner, doc_id, label)
        conn, _ = self._conn(connection)
        sql = (f"SELECT * FROM {self.settings.schema_name}.tasks {where} ORDER BY id DESC LIMIT %s")
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            cur.execute(sql, (*params, limit))
            return [Task.model_validate(r) for r in cur.fetchall()]

    # -- control

    def cancel(self, task_id: int | Sequence[int] | None = None, *, doc_id: int | None = None,
               reason: str = "Task stopped by user.", connection: Any = None) -> dict[int, str]:
        """Cancel tasks by id and/or document. Returns {id: status}: ``cancelled`` for tasks stopped at
        once, ``running`` for tasks whose worker was told (they end ``cancelled`` shortly)."""
        ids = [task_id] if isinstance(task_id, int) else list(task_id or [])
        conn, _ = self._conn(connection)
        return self._cancel_in(conn, ids, doc_id, reason)  # one statement: atomic without BEGIN/COMMIT

    def _cancel_in(self, conn: psycopg.Connection[Any], ids: builtins.list[int], doc_id: int | None,
                   reason: str) -> dict[int, str]:
        try:
            rows = self._fetch(conn, self.q.cancel, (ids, doc_id, _stamp(f"[Canceled] {reason}"),
                                                self.settings.progress_log_chars, _stamp(DEPENDENT_CANCELLED)))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise PermissionDenied(_first_line(exc)) from None
        result = {int(r[0]): str(r[1]) for r in rows}
        for i in ids:
            if i not in result:
                result[i] = self._state_of(conn, i)
        return result

    def _state_of(self, conn: psycopg.Connection[Any], task_id: int) -> str:
        rows = self._fetch(conn, self.q.task_status, (task_id,))
        if not rows:
            raise TaskNotFound(f"no task with id {task_id}")
        return str(rows[0][0])

    def retry(self, task_id: int | None = None, *, doc_id: int | None = None,
              connection: Any = None) -> dict[int, str]:
        """Send a failed or cancelled task (or every such task of a document) back to the queue for a
        fresh set of retries. Returns {id: status}: ``queued``, or ``waiting`` for a task whose parents
        are not all done (a document's follow-up task waits for its retried ranges)."""
        ids = retry_targets(task_id, doc_id)
        conn, _ = self._conn(connection)
        try:
            rows = self._fetch(conn, self.q.retry, (ids, doc_id, _stamp(RETRY_LINE), self.settings.progress_log_chars))
        except psycopg.errors.UniqueViolation as exc:
            raise DedupeConflict(_first_line(exc)) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise PermissionDenied(_first_line(exc)) from None
        result = {int(r[0]): str(r[1]) for r in rows}
        if task_id is not None and task_id not in result:
            raise not_retried(task_id, self._state_of(conn, task_id))
        if not result:
            raise not_retried(None, None, doc_id)
        return result


RETRY_LINE = "[RETRY] requeued by user"
DEPENDENT_CANCELLED = "[Canceled] a parent task was cancelled"


def retry_targets(task_id: int | None, doc_id: int | None) -> builtins.list[int]:
    """The ids a retry names (shared by both clients); a retry must name something."""
    if task_id is None and doc_id is None:
        raise InvalidPayload("retry needs a task id or a doc_id")
    return [] if task_id is None else [task_id]


def not_retried(task_id: int | None, status: str | None, doc_id: int | None = None) -> InvalidTransition:
    """Why a retry changed nothing (shared by both clients)."""
    if task_id is None:
        return InvalidTransition(f"document {doc_id} has no failed or cancelled task to retry")
    return InvalidTransition(f"task {task_id} is {status}; only failed or cancelled tasks can be retried")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def _rejected(exc: psycopg.Error) -> InvalidPayload:
    """One line saying what the database refused; a foreign key names the missing row (e.g. a doc_id
    with no document), other details are left out because they may echo a whole payload."""
    msg = f"rejected by the database: {str(exc).splitlines()[0]}"
    if isinstance(exc, psycopg.errors.ForeignKeyViolation) and exc.diag.message_detail:
        msg += f" ({exc.diag.message_detail})"
    return InvalidPayload(msg)


def _filters(status: str | Sequence[str] | None, type: str | Sequence[str] | None, owner: str | None,
             doc_id: int | None, label: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if status:
        clauses.append("status = ANY(%s)")
        params.append([status] if isinstance(status, str) else list(status))
    if type:
        clauses.append("type = ANY(%s)")
        params.append([type] if isinstance(type, str) else list(type))
    if owner is not None:
        clauses.append("owner = %s")
        params.append(owner)
    if doc_id is not None:
        clauses.append("doc_id = %s")
        params.append(doc_id)
    if label is not None:
        clauses.append("labels @> ARRAY[%s]")
        params.append(label)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


# ---------------------------------------------------------------- module-level convenience

_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def enqueue(type: str, payload: Any = None, **kwargs: Any) -> int:
    """Enqueue one task with the default client; see :meth:`Client.enqueue`."""
    return default_client().enqueue(type, payload, **kwargs)


def enqueue_many(type: str, items: Iterable[Any], **kwargs: Any) -> list[int]:
    return default_client().enqueue_many(type, items, **kwargs)


def get(task_id: int, **kwargs: Any) -> Task:
    return default_client().get(task_id, **kwargs)


def list_tasks(**kwargs: Any) -> list[Task]:
    return default_client().list(**kwargs)


def cancel(task_id: int | Sequence[int] | None = None, **kwargs: Any) -> dict[int, str]:
    return default_client().cancel(task_id, **kwargs)


def retry(task_id: int | None = None, **kwargs: Any) -> dict[int, str]:
    return default_client().retry(task_id, **kwargs)


__all__ = ["Client", "TaskSpec", "cancel", "enqueue", "enqueue_many", "get", "list_tasks", "retry"]
