"""Turn a producer's call into the parameters of client.sql's statements, once for both clients.

Everything a user can get wrong is checked here, before the first write, so a bad call writes
nothing and says why in one line (an :class:`InvalidPayload`). The sync and async clients differ
only in how they send the parameters built here (procrastinate's shared kwargs builder).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

from jobqueue import registry, tracing
from jobqueue.client import fields
from jobqueue.errors import InvalidPayload, PayloadTooLarge, TaskNotFound
from jobqueue.models import TaskSpec
from jobqueue.settings import Settings
from jobqueue.states import RunOn, Status

MAX_DEPTH = 64
LIVE = (Status.WAITING.value, Status.QUEUED.value, Status.RUNNING.value)
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# One encoder for every payload: json.dumps with options builds a new JSONEncoder per call.
_TO_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_SCALARS = (str, int, float, bool, type(None))
# JSON arrays: json.dumps writes a tuple as an array, so it gets the same checks as a list.
_ARRAYS = (list, tuple)


class TaskRow(NamedTuple):
    """A validated task, named by its columns of the tasks table (COPY writes them in this order)."""

    type: str
    priority: int
    payload: str  # JSON text for jsonb
    run_at: datetime | None
    max_retries: int
    dedupe_key: str | None
    doc_id: int | None
    batch_id: int | None
    from_page: int | None
    to_page: int | None
    owner: str | None
    digest: str | None
    trace_context: str | None  # JSON text for jsonb: the enqueueing span's context (jobqueue.tracing)


# The columns of client.sql's copy_tasks, in order: a reserved id, the row, the batch's labels. A batch
# without labels leaves the column out (copy_tasks_unlabelled): its default is the same empty array, and
# encoding one per row cost about 2 µs of client CPU a task, a sixth of a COPY batch's Python.
COPY_COLUMNS = ("id", *TaskRow._fields, "labels")
UNLABELLED_COLUMNS = COPY_COLUMNS[:-1]
# A batch of bare payloads (no labels, no run_at, none of the optional columns) copies only these
# (client.sql copy_tasks_bare): every other column takes its default, run_at the server's now(), so
# the server parses 6 fields a row instead of 14 (bench/enqueue_cost.py).
BARE_COLUMNS = ("id", "type", "priority", "payload", "max_retries", "trace_context")
# Rows of a bare COPY per chunk the client sends while it formats the next: the first chunk is small and
# each next one twice the last, up to COPY_CHUNK_ROWS, so the server starts parsing after 32 rows' worth
# of client work instead of 256 (about 0.1 ms instead of 0.6 ms of a 1,000-row batch's ~8 ms).
FIRST_CHUNK_ROWS = 32
COPY_CHUNK_ROWS = 256


class Plan(NamedTuple):
    """How a new task starts, from its parents' states."""

    status: str
    pending: int
    line: str


NO_DEPENDENCIES = Plan(Status.QUEUED.value, 0, "")


# ---------------------------------------------------------------- scalar fields


def _run_at(run_at: datetime | None, delay: float | timedelta | None) -> datetime | None:
    if run_at is not None and delay is not None:
        raise InvalidPayload("give run_at or delay, not both")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, int | float | timedelta):
            raise InvalidPayload(f"delay must be seconds or a timedelta, got {type(delay).__name__}")
        try:
            seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        except OverflowError:
            raise InvalidPayload("delay is out of range") from None
        if not math.isfinite(seconds):
            raise InvalidPayload("delay must be a finite number of seconds")
        try:
            return datetime.now(UTC) + timedelta(seconds=seconds)
        except OverflowError:
            raise InvalidPayload(f"delay of {seconds:g}s is out of range") from None
    if run_at is None:
        return None
    if not isinstance(run_at, datetime):
        raise InvalidPayload(f"run_at must be a datetime, got {type(run_at).__name__}")
    if run_at.tzinfo is None:
        return run_at.replace(tzinfo=UTC)  # naive times are taken as UTC
    try:  # 0001-01-01 00:00+05 is year 0 in UTC: PostgreSQL stores it, but no client can read it back
        return run_at.astimezone(UTC)
    except OverflowError:
        raise InvalidPayload(f"run_at {run_at.isoformat()} is outside years 1-9999 in UTC") from None


def _max_retries(t: registry.TaskType, value: int | None, settings: Settings) -> int:
    v = fields.int32("max_retries", value if value is not None
               else (t.max_retries if t.max_retries is not None else settings.max_retries))
    if v is None or v < 0:
        raise InvalidPayload("max_retries must be >= 0")
    return v


# ---------------------------------------------------------------- payload


def _depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse payloads nested deeper than `limit` (iteratively: a deep payload cannot overflow the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list | tuple):
            if d > limit:
                raise InvalidPayload(f"payload is nested deeper than {limit} levels")
            if isinstance(v, dict):
                # json.dumps would turn 1, 1.5, True, None into "1", "1.5", "true", "null": get() would
                # return a different object than the one enqueued.
                if not all(isinstance(k, str) for k in v):
                    bad = next(k for k in v if not isinstance(k, str))
                    raise InvalidPayload(f"payload object keys must be strings, got {type(bad).__name__} {bad!r}")
                stack.extend((c, d + 1) for c in v.values())
            else:
                stack.extend((c, d + 1) for c in v)


def encode_payload(task_type: str, payload: Any, settings: Settings) -> str:
    """Validate against the type's payload model (if any) and encode as JSON text for jsonb."""
    return _encode(registry.get_type(task_type), payload, settings)


def _encode(spec: registry.TaskType, payload: Any, settings: Settings) -> str:
    if spec.payload is not None:
        try:
            model = payload if isinstance(payload, spec.payload) else spec.payload.model_validate(payload)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "payload"
            raise InvalidPayload(f"invalid payload for {spec.name!r}: {where}: {err['msg']}") from None
        except RecursionError:
            raise InvalidPayload(f"payload is nested deeper than {MAX_DEPTH} levels") from None
        payload = model.model_dump(mode="json")
    elif isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    if payload is None:
        payload = {}
    # A flat object of scalars (the common payload) cannot be too deep; skip the walk.
    if not (isinstance(payload, dict) and all(type(k) is str and isinstance(v, _SCALARS) for k, v in payload.items())):
        _depth(payload)
    try:
        text = _TO_JSON(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"payload is not JSON-serialisable: {exc}") from None
    except RecursionError:  # an object nested inside something json walks but _depth does not
        raise InvalidPayload(f"payload is nested deeper than {MAX_DEPTH} levels") from None
    # An escaped NUL, not a literal backslash followed by "u0000" (the substring test spares most
    # payloads the regular expression).
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise InvalidPayload("payload contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store")
    try:
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidPayload("payload contains invalid Unicode (a lone surrogate)") from None
    if size > settings.max_payload_bytes:
        raise PayloadTooLarge(f"payload is {size} bytes, over the limit of {settings.max_payload_bytes}")
    return text


# ---------------------------------------------------------------- rows


def row(task_type: str, spec: TaskSpec, settings: Settings) -> TaskRow:
    """One task spec, validated into its named row."""
    t = registry.for_enqueue(task_type, settings.schema_name)
    return _row(t, spec, settings, _encode(t, spec.payload, settings), tracing.current_context())


def _row(t: registry.TaskType, spec: TaskSpec, settings: Settings, payload: str, trace: str | None) -> TaskRow:
    priority = fields.int32("priority", spec.priority if spec.priority is not None else t.priority)
    assert priority is not None
    # Positional, in TaskRow's field order: keywords cost a microsecond more per task.
    return TaskRow(t.name, priority, payload, _run_at(spec.run_at, spec.delay),
                   _max_retries(t, spec.max_retries, settings), fields.text("dedupe_key", spec.dedupe_key),
                   fields.bigint("doc_id", spec.doc_id),
                   fields.bigint("batch_id", spec.batch_id), fields.int32("from_page", spec.from_page),
                   fields.int32("to_page", spec.to_page), fields.text("owner", spec.owner, limit=200),
                   fields.text("digest", spec.digest, limit=200), trace)


def rows_for(task_type: str, items: Iterable[Any], settings: Settings) -> list[TaskRow]:
    """Rows of an enqueue_many batch: a bare payload takes the type's defaults, computed once."""
    t = registry.for_enqueue(task_type, settings.schema_name)
    d = _row(t, TaskSpec(), settings, "", tracing.current_context())
    return [_row(t, item, settings, _encode(t, item.payload, settings), d.trace_context) if isinstance(item, TaskSpec)
            else TaskRow(d.type, d.priority, _encode(t, item, settings), None, d.max_retries,
                         None, None, None, None, None, None, None, d.trace_context)
            for item in items]


def labels(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise InvalidPayload("labels must be a list of strings")
    return [fields.text("label", v, limit=200) or "" for v in values]


def dependencies(depends_on: Sequence[int] | None) -> list[int] | None:
    """The parents in id order: the order lock_parents locks them in."""
    if not depends_on:
        return None
    if isinstance(depends_on, int | str):
        raise InvalidPayload("depends_on must be a list of task ids")
    ids = {fields.bigint("depends_on", p) for p in depends_on}
    return sorted(i for i in ids if i is not None)


def stamp(msg: str) -> str:
    """A progress-log line as the runtime writes them."""
    return f"{datetime.now().strftime('%H:%M:%S')} {msg}"


def run_on(value: str | None, deps: Sequence[int] | None) -> str | None:
    """The run_on of a new task (None: the column's default, success)."""
    if value is None:
        return None
    if value not in {r.value for r in RunOn}:
        raise InvalidPayload(f"run_on must be one of {', '.join(RunOn)}, got {value!r}")
    if value != RunOn.SUCCESS and not deps:
        raise InvalidPayload(f"run_on={value!r} needs depends_on (the parents whose outcome it waits for)")
    return str(value)


def plan_dependencies(parents: Iterable[Mapping[str, Any]], wanted: Sequence[int],
                      when: str | None = None) -> Plan:
    """Status, pending count and log line of a new task from its locked parents' rows (id, status)."""
    found = {int(p["id"]): str(p["status"]) for p in parents}
    missing = [p for p in wanted if p not in found]
    if missing:
        raise TaskNotFound(f"depends_on names unknown task(s): {', '.join(map(str, missing))}")
    dead = [p for p, s in found.items() if s in (Status.FAILED, Status.CANCELLED)]
    if dead and when in (None, RunOn.SUCCESS):
        return Plan(Status.CANCELLED.value, 0, stamp(f"[Canceled] parent task {dead[0]} is {found[dead[0]]}"))
    # A callback (always / failure) waits for every parent to finish, whatever the outcome.
    finished = (Status.DONE,) if when in (None, RunOn.SUCCESS) else (Status.DONE, Status.FAILED, Status.CANCELLED)
    pending = sum(1 for s in found.values() if s not in finished)
    if not pending and when == RunOn.FAILURE and not dead:
        return Plan(Status.CANCELLED.value, 0, stamp("[Canceled] no parent task failed"))
    return Plan(Status.WAITING.value if pending else Status.QUEUED.value, pending, "")


# ---------------------------------------------------------------- statement parameters


def enqueue_params(r: TaskRow, labels: list[str] | None, deps: list[int] | None, plan: Plan,
                   when: str | None = None) -> tuple[Any, ...]:
    """client.sql `enqueue` ($1..$19)."""
    return (r.type, r.priority, r.payload, r.run_at, r.max_retries, r.dedupe_key, r.doc_id, r.batch_id,
            r.from_page, r.to_page, r.owner, labels, r.digest, plan.status, deps, plan.pending, plan.line, when,
            r.trace_context)


def enqueue_many_params(rows: Sequence[TaskRow], labels: Sequence[str | None]) -> tuple[Any, ...]:
    """client.sql `enqueue_many`: one array per column ($1..$13), then each row's labels as JSON
    ($14, see :func:`labels_json`)."""
    return (*([getattr(r, f) for r in rows] for f in TaskRow._fields), list(labels))


def labels_json(labels: list[str] | None) -> str | None:
    """One row's labels for `enqueue_many`, whose rows each have their own (a ragged text[][] cannot be
    sent: PostgreSQL's arrays are rectangular)."""
    return None if labels is None else json.dumps(labels)


def has_dedupe_keys(rows: Sequence[TaskRow]) -> bool:
    """Batches with dedupe keys need the conflict handling of `enqueue_many`; the others can COPY."""
    return any(r.dedupe_key is not None for r in rows)


def copy_columns(labels: list[str] | None) -> tuple[str, ...]:
    """The columns copy_records writes for a batch with these labels (see UNLABELLED_COLUMNS)."""
    return COPY_COLUMNS if labels else UNLABELLED_COLUMNS


def copy_records(ids: Sequence[int], rows: Sequence[TaskRow], labels: list[str] | None) -> list[tuple[Any, ...]]:
    """COPY records in copy_columns(labels) order. run_at is given for every row (a row that has one
    needs the column, and COPY takes a column for all rows): the default, now, is filled in here."""
    now = datetime.now(UTC)
    if labels:
        return [(i, *r[:3], r[3] or now, *r[4:], labels) for i, r in zip(ids, rows, strict=True)]
    return [(i, *r[:3], r[3] or now, *r[4:]) for i, r in zip(ids, rows, strict=True)]


def bare_batch(items: Sequence[Any], labels: list[str] | None) -> bool:
    """Whether the batch fits BARE_COLUMNS: no labels, and payloads only (a TaskSpec goes the wide way)."""
    return not labels and not any(isinstance(item, TaskSpec) for item in items)


class BareCopy:
    """COPY text lines of BARE_COLUMNS for one enqueue_many call: the type's defaults are looked up once.

    A chunk at a time, so a caller can send one while it makes the next: :meth:`payloads` validates and
    encodes (everything a user can get wrong), :meth:`lines` only formats.
    """

    def __init__(self, task_type: str, settings: Settings, encoding: str = "utf-8") -> None:
        self._type = registry.for_enqueue(task_type, settings.schema_name)
        self._settings = settings
        self._encoding = encoding
        d = _row(self._type, TaskSpec(), settings, "", tracing.current_context())
        self._head = f"\t{d.type}\t{d.priority}\t"
        self._tail = f"\t{d.max_retries}\t{_copy_field(d.trace_context)}\n"

    def payloads(self, items: Sequence[Any]) -> list[str]:
        """Each payload as COPY field text. The JSON encoder escapes every control character, and a type
        is [A-Za-z0-9_.:-]: a backslash is all COPY's text format needs escaped."""
        return [_copy_field(_encode(self._type, item, self._settings)) for item in items]

    def lines(self, ids: Sequence[int], payloads: Sequence[str]) -> bytes:
        """The lines of these rows, in the connection's client_encoding."""
        head, tail = self._head, self._tail
        text = "".join([f"{i}{head}{p}{tail}" for i, p in zip(ids, payloads, strict=True)])
        try:
            return text.encode(self._encoding)
        except UnicodeEncodeError as exc:
            raise InvalidPayload(f"payload has a character the connection's encoding ({self._encoding}) "
                                 f"cannot hold: {exc.reason}") from None


def chunks(n: int) -> list[slice]:
    """The slices of a batch of n rows that a COPY sends one at a time (FIRST_CHUNK_ROWS, then doubling
    up to COPY_CHUNK_ROWS)."""
    parts, start, size = [], 0, FIRST_CHUNK_ROWS
    while start < n:
        parts.append(slice(start, min(n, start + size)))
        start, size = start + size, min(2 * size, COPY_CHUNK_ROWS)
    return parts


def _copy_field(text: str | None) -> str:
    if text is None:
        return "\\N"
    return text.replace("\\", "\\\\") if "\\" in text else text


def merge_batch_ids(ids: list[int | None], todo: list[int], found: Iterable[Mapping[str, Any]]) -> list[int]:
    """Fill `ids` from an `enqueue_many` run over the rows `todo`; return the rows still unresolved.

    A row comes back without an id when its dedupe key conflicted with a task another producer
    committed after this statement's snapshot was taken: ON CONFLICT sees that task, the statement's
    look-up does not. Running the statement again for those rows (a new snapshot) finds it, or, if
    it finished meanwhile, inserts the row (issue 11, item 14).
    """
    for i, r in zip(todo, found, strict=True):
        ids[i] = None if r["id"] is None else int(r["id"])
    return [i for i in todo if ids[i] is None]


def cancel_params(ids: Sequence[int], doc_id: int | None, reason: str, settings: Settings) -> tuple[Any, ...]:
    """client.sql `cancel` ($1..$5)."""
    return (list(ids), doc_id, stamp(f"[Canceled] {reason}"), settings.progress_log_chars,
            stamp("[Canceled] a parent task was cancelled"))


def cancel_ids(task_id: int | Sequence[int] | None) -> list[int]:
    return [task_id] if isinstance(task_id, int) else list(task_id or [])


def retry_ids(task_id: int | None, doc_id: int | None) -> list[int]:
    """The ids a retry names; a retry must name a task or a document."""
    if task_id is None and doc_id is None:
        raise InvalidPayload("retry needs a task id or a doc_id")
    return [] if task_id is None else [task_id]


def retry_params(ids: Sequence[int], doc_id: int | None, settings: Settings) -> tuple[Any, ...]:
    """client.sql `retry` ($1..$4)."""
    return (list(ids), doc_id, stamp("[RETRY] requeued by user"), settings.progress_log_chars)


# ---------------------------------------------------------------- control by selector

# The statuses each bulk action may touch (the SQL functions of migration 0008 enforce the same).
CANCELLABLE = LIVE
RETRYABLE = (Status.FAILED.value, Status.CANCELLED.value)
REPRIORITISABLE = (Status.WAITING.value, Status.QUEUED.value)


class Selector(NamedTuple):
    """The filters of a bulk action, in the order client.sql's `*_where` statements take them."""

    type: str | None
    owner: str | None
    batch_id: int | None
    label: str | None
    doc_id: int | None
    status: list[str] | None

    def is_empty(self) -> bool:
        return all(v is None for v in self)


def selector(action: str, allowed: Sequence[str], type: str | None, owner: str | None, batch_id: int | None,
             label: str | None, doc_id: int | None, status: str | Sequence[str] | None) -> Selector:
    """Validated filters; `status` must be among `allowed` (what `action` can change)."""
    statuses = fields.many(status)
    for s in statuses or []:
        if s not in allowed:
            raise InvalidPayload(f"cannot {action} {s!r} tasks: status must be among {', '.join(allowed)}")
    return Selector(fields.text("type", type, limit=200), fields.text("owner", owner, limit=200),
                    fields.bigint("batch_id", batch_id), fields.text("label", label, limit=200),
                    fields.bigint("doc_id", doc_id), statuses)


def required(action: str, sel: Selector) -> Selector:
    """A bulk action without any filter would act on every task: refused, never a default."""
    if sel.is_empty():
        raise InvalidPayload(f"{action} needs a selector (type, owner, batch_id, label, doc_id or status); "
                             "nothing is selected by default")
    return sel


def cancel_where_params(sel: Selector, reason: str, settings: Settings) -> tuple[Any, ...]:
    """client.sql `cancel_where` ($1..$9)."""
    return (*sel, *cancel_params([], None, reason, settings)[2:])


def retry_where_params(sel: Selector, settings: Settings) -> tuple[Any, ...]:
    """client.sql `retry_where` ($1..$8)."""
    return (*sel, *retry_params([], None, settings)[2:])


def prioritize_params(ids: Sequence[int], sel: Selector, priority: int) -> tuple[Any, ...]:
    """client.sql `prioritize` ($1..$8): ids, or a selector, or both (the tasks both name)."""
    if not ids:
        required("prioritize", sel)
    checked = fields.int32("priority", priority)
    if checked is None:
        raise InvalidPayload("priority is required")
    return ([fields.bigint("task id", i) for i in ids] or None, *sel, checked)


def queue_params(task_type: str, *, paused: bool | None = None, max_running: int | None = None,
                 uncap: bool = False) -> tuple[Any, ...]:
    """client.sql `set_queue` ($1..$4): a type name as the tasks table accepts it, a cap of 0 or more."""
    if not isinstance(task_type, str) or not registry.TYPE_NAME.fullmatch(task_type):
        raise InvalidPayload(f"task type name {task_type!r} must be 1-48 characters among letters, digits and _ . : -")
    cap = fields.int32("max_running", max_running)
    if cap is not None and cap < 0:
        raise InvalidPayload(f"max_running must be 0 or more, got {cap}")
    return (task_type, paused, cap, uncap)
