"""Documents in, tasks out: store each file, split it into page/row-range tasks, reuse what is unchanged.

Every file is checked (readable, supported, not encrypted or corrupt, within the size limit, with
something to split) before anything is written, and then written under a savepoint of its own, so a
bad file gets one error line and leaves no row behind while the other files of the call enqueue.

A document is its content (per owner): enqueueing the same bytes again re-parses that document.
Each task carries a digest of the content, its settings and its range; a task whose digest matches a
finished task of the previous run is recorded done at once and takes over that task's chunks, so
only what changed runs again (``force`` reprocesses everything). The previous run's other tasks stay
as history, marked superseded (the pruner removes them like any finished task); the chunks no new
task took over are deleted, as RAGFlow does.

A re-enqueue never drops work it was not asked to redo: when every range is unchanged, the previous
run's follow-up tasks (the RAPTOR summaries) are carried over with their output too; when ranges do
run again without ``--then raptor``, the summaries would be stale, so the file is refused unless
``force`` says to remove them (and the result says how many went).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from jobqueue import Client, DocumentError, JobqError, Settings, TaskSpec, connect, get_settings, get_type, traced

from . import splitter
from .extras import require_document_stack
from .queries import DocumentSQL, fetch, sql

DATAFLOW = "dataflow"


@dataclass(frozen=True)
class FileResult:
    """What became of one file: a document with its tasks, or the one-line reason it was refused."""

    path: str
    doc_id: int | None = None
    tasks: list[int] = field(default_factory=list)
    reused: int = 0
    queued: int = 0
    then_task: int | None = None
    error: str | None = None
    note: str | None = None
    summaries_removed: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class BatchResult:
    batch_id: int | None
    files: list[FileResult]

    @property
    def doc_ids(self) -> list[int]:
        return list(dict.fromkeys(f.doc_id for f in self.files if f.doc_id is not None))

    @property
    def errors(self) -> list[FileResult]:
        return [f for f in self.files if not f.ok]


@dataclass(frozen=True)
class _Prepared:
    """A file that passed every check, with its task ranges; nothing written yet."""

    path: str
    name: str
    data: bytes
    format: str
    kind: str
    units: int
    ranges: list[tuple[int, int]]
    content_digest: str
    uri: str | None


@dataclass(frozen=True)
class _Plan:
    parser: str
    page_size: int | None
    pages: list[tuple[int, int]] | None
    priority: int
    then: str | None
    owner: str | None
    by_reference: bool
    force: bool
    payload: dict[str, Any]
    then_payload: dict[str, Any] | None


def _payload(task_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """The payload with the type's defaults filled in, so digests change when a default does."""
    model = get_type(task_type).payload
    return model.model_validate(data).model_dump(mode="json") if model is not None else data


def _stamp(line: str) -> str:
    return f"{datetime.now().strftime('%H:%M:%S')} {line}"


def _range_prefix(lo: int | None, hi: int | None) -> str:
    return f"Page({lo + 1}~{hi}): " if lo is not None and hi is not None else ""


class Blob(str):
    """A document given as bytes (jobq_workers.enqueue_document): its name, as a path is, and its bytes.

    A ``str`` so it travels through :func:`enqueue_files` exactly as a path does (same checks, same
    reuse, its name in the result); only :func:`prepare` reads it differently."""

    data: bytes

    def __new__(cls, name: str, data: bytes) -> Blob:
        blob = super().__new__(cls, name)
        blob.data = data
        return blob


def _read_blob(blob: Blob, plan: _Plan, settings: Settings) -> bytes:
    if plan.by_reference:
        raise DocumentError("by_reference needs a file path, not bytes")
    if len(blob.data) > settings.max_document_bytes:
        raise DocumentError(f"{len(blob.data)} bytes is over the limit of {settings.max_document_bytes} bytes "
                            "(JOBQ_MAX_DOCUMENT_BYTES)")
    return blob.data


def prepare(path: str, plan: _Plan, settings: Settings) -> _Prepared:
    """Read and check one file; raises DocumentError with the reason (without the path)."""
    p = Path(path)
    if isinstance(path, Blob):
        return _inspected(path, p, _read_blob(path, plan, settings), plan)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise DocumentError("is a directory")
        limit = settings.max_document_bytes
        if not plan.by_reference and size > limit:
            raise DocumentError(f"{size} bytes is over the limit of {limit} bytes (JOBQ_MAX_DOCUMENT_BYTES); "
                                "store large files on shared storage with --by-reference")
        data = p.read_bytes()
    except FileNotFoundError:
        raise DocumentError("no such file") from None
    except OSError as exc:
        raise DocumentError(exc.strerror or str(exc)) from None
    return _inspected(path, p, data, plan)


def _inspected(path: str, p: Path, data: bytes, plan: _Plan) -> _Prepared:
    try:
        layout = splitter.inspect(p.name, data)  # one parse: detection, validation and counting
        ranges = splitter.split(layout.kind, layout.units, parser=plan.parser, page_size=plan.page_size,
                                pages=plan.pages if layout.kind == "pdf" else None)
    except ValueError as exc:  # UnsupportedDocument included
        raise DocumentError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return _Prepared(path, p.name, data, layout.format, layout.kind, layout.units, ranges,
                     splitter.content_digest(data), str(p.resolve()) if plan.by_reference else None)


def _make_plan(parser: str, page_size: int | None, pages: str | Sequence[tuple[int, int]] | None, priority: int,
               then: str | None, owner: str | None, by_reference: bool, force: bool) -> _Plan:
    """Check the call's options once, before any file: a bad option is the caller's error, not a file's."""
    if parser not in splitter.PARSERS:
        raise DocumentError(f"unknown parser {parser!r} (one of: {', '.join(splitter.PARSERS)})")
    if page_size is not None and page_size < 1:
        raise DocumentError(f"--page-size must be at least 1, got {page_size}")
    try:
        ranges = splitter.parse_pages(pages) if isinstance(pages, str) else (list(pages) if pages else None)
    except ValueError as exc:
        raise DocumentError(str(exc)) from None
    payload = _payload(DATAFLOW, {"parser": parser})
    then_payload = _payload(then, {}) if then else None
    return _Plan(parser, page_size, ranges, priority, then, owner, by_reference, force, payload, then_payload)


def enqueue_files(
    paths: Sequence[str],
    *,
    parser: str = "general",
    page_size: int | None = None,
    pages: str | Sequence[tuple[int, int]] | None = None,
    priority: int = 0,
    then: str | None = None,
    owner: str | None = None,
    by_reference: bool = False,
    force: bool = False,
    url: str | None = None,
    settings: Settings | None = None,
) -> BatchResult:
    """Enqueue documents as one batch; returns a result per file (bad files carry their error).

    Raises :class:`DocumentError` only for a bad option or a missing document stack, before anything
    is read or written.
    """
    require_document_stack()
    settings = settings or get_settings()
    plan = _make_plan(parser, page_size, pages, priority, then, owner, by_reference, force)
    prepared: list[_Prepared | FileResult] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            prep = prepare(path, plan, settings)
        except DocumentError as exc:
            prepared.append(FileResult(path, error=str(exc)))
            continue
        if prep.content_digest in seen:
            prepared.append(FileResult(path, note=f"same content as {seen[prep.content_digest]}; enqueued once"))
            continue
        seen[prep.content_digest] = path
        prepared.append(prep)
    if not any(isinstance(p, _Prepared) for p in prepared):
        return BatchResult(None, [p for p in prepared if isinstance(p, FileResult)])

    client = Client(url, settings=settings)
    q = sql(settings.schema_name)
    results: list[FileResult] = []
    with connect(client.url, autocommit=True) as conn:
        try:
            with conn.transaction():
                batch_id = int(_one(conn, q.new_batch, owner, len(paths)))
                for item in prepared:
                    if isinstance(item, FileResult):
                        results.append(item)
                    else:
                        results.append(_store_safely(conn, q, client, item, batch_id, plan))
                if not any(r.doc_id is not None for r in results):
                    raise _NothingStored  # every file refused: no empty batch is left behind
                fetch(conn, q.batch_rejected, batch_id, sum(1 for r in results if not r.ok))
        except _NothingStored:
            return BatchResult(None, results)
    return BatchResult(batch_id, results)


class _NothingStored(Exception):
    """Rolls back a batch none of whose files was stored."""


def _store_safely(conn: psycopg.Connection[Any], q: DocumentSQL, client: Client, item: _Prepared, batch_id: int,
                  plan: _Plan) -> FileResult:
    """One file under a savepoint of its own: refused by us or by the database, it leaves no row. One
    trace per document: its range tasks and its follow-up (raptor) are enqueued under one span."""
    try:
        with (traced("jobq.enqueue document", {"jobq.document.path": item.path, "jobq.batch_id": batch_id}),
              conn.transaction()):
            return _store(conn, q, client, item, batch_id, plan)
    except JobqError as exc:
        return FileResult(item.path, error=str(exc))
    except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
        return FileResult(item.path, error=f"rejected by the database: {str(exc).splitlines()[0]}")


def _one(conn: psycopg.Connection[Any], statement: str, *params: Any) -> Any:
    rows = fetch(conn, statement, *params)
    return rows[0][0] if rows else None


def _document_row(conn: psycopg.Connection[Any], q: DocumentSQL, prep: _Prepared, batch_id: int,
                  plan: _Plan) -> int:
    """Insert the document, or lock and update the existing one with the same content."""
    meta = (batch_id, prep.name, len(prep.data), prep.format, prep.kind, plan.parser, prep.units)
    rows = fetch(conn, q.find_document, plan.owner, prep.content_digest)
    if not rows:
        new_id = _one(conn, q.insert_document, *meta, prep.content_digest, None if prep.uri else prep.data,
                      prep.uri, plan.owner)
        if new_id is not None:
            return int(new_id)
        rows = fetch(conn, q.find_document, plan.owner, prep.content_digest)  # a concurrent call won
        assert rows
    doc_id, stored = int(rows[0][0]), bool(rows[0][1])
    live = _one(conn, q.live_task_count, doc_id)
    if live:
        raise DocumentError(f"document {doc_id} has the same content and is still being processed ({live} live "
                            f"task(s)); wait for it or run `jobq cancel --doc {doc_id}`")
    # The bytes travel again only when the storage mode changes (see update_document).
    fetch(conn, q.update_document, doc_id, *meta, prep.uri, None if prep.uri or stored else prep.data)
    return doc_id


def _reuse(conn: psycopg.Connection[Any], q: DocumentSQL, old_id: int, batch_id: int, plan: _Plan,
           lo: int | None, hi: int | None) -> tuple[int, int]:
    """Record a new task done at once with the chunks of finished task `old_id`; returns (id, chunks).
    A SECURITY DEFINER function (migration 0005), so a producer needs no grant on chunks."""
    line = _stamp(f"{_range_prefix(lo, hi)}Reused {{moved}} chunk(s) of task {old_id}: content and settings unchanged.")
    new_id, moved = fetch(conn, q.reuse_task, old_id, batch_id, plan.priority, plan.owner, line)[0]
    return int(new_id), int(moved)


def _store(conn: psycopg.Connection[Any], q: DocumentSQL, client: Client, prep: _Prepared, batch_id: int,
           plan: _Plan) -> FileResult:
    doc_id = _document_row(conn, q, prep, batch_id, plan)
    reusable: dict[tuple[str, str], int] = {}
    if not plan.force:
        for tid, ttype, digest in fetch(conn, q.reusable_tasks, doc_id):
            reusable[(ttype, digest)] = tid

    kept: list[int] = []
    flow_ids: list[int] = []
    specs: list[TaskSpec] = []
    for lo, hi in prep.ranges:
        digest = splitter.task_digest(prep.content_digest, {"type": DATAFLOW, **plan.payload}, lo, hi)
        old = reusable.get((DATAFLOW, digest))
        if old is not None:
            new_id, _ = _reuse(conn, q, old, batch_id, plan, lo, hi)
            kept.append(new_id)
        else:
            specs.append(TaskSpec(payload=plan.payload, priority=plan.priority, doc_id=doc_id, batch_id=batch_id,
                                  from_page=lo, to_page=hi, owner=plan.owner, digest=digest))
    flow_ids.extend(kept)
    then_digest = None
    then_id: int | None = None
    if plan.then:
        then_digest = splitter.task_digest(
            prep.content_digest, {"type": plan.then, "payload": plan.then_payload, "dataflow": plan.payload,
                                  "ranges": prep.ranges}, 0, prep.units)
        old = reusable.get((plan.then, then_digest))
        if old is not None and not specs:  # its input (every dataflow task) is unchanged too
            then_id, _ = _reuse(conn, q, old, batch_id, plan, None, None)
            kept.append(then_id)
    removed = _keep_follow_ups(conn, q, doc_id, reusable, kept, batch_id, plan, rerun=bool(specs))
    fetch(conn, q.replace_document_run, doc_id, kept)
    new_ids = client.enqueue_many(DATAFLOW, specs, connection=conn) if specs else []
    flow_ids.extend(new_ids)
    if plan.then and then_id is None:
        then_id = client.enqueue(plan.then, plan.then_payload, priority=plan.priority, doc_id=doc_id,
                                 batch_id=batch_id, owner=plan.owner, digest=then_digest,
                                 depends_on=sorted(flow_ids), connection=conn)
    queued = len(new_ids) + (1 if then_id is not None and then_id not in kept else 0)
    return FileResult(prep.path, doc_id=doc_id, tasks=sorted(flow_ids), reused=len(kept), queued=queued,
                      then_task=then_id, summaries_removed=removed)


def _keep_follow_ups(conn: psycopg.Connection[Any], q: DocumentSQL, doc_id: int, reusable: dict[tuple[str, str], int],
                     kept: list[int], batch_id: int, plan: _Plan, *, rerun: bool) -> int:
    """The previous run's follow-up tasks (raptor) that this call did not ask for.

    With every range unchanged their output (the summaries) is still valid: they are carried over
    into the new run (appended to `kept`). When ranges run again the summaries would describe
    chunks that are replaced: without ``--then`` that is refused unless ``force`` says to remove
    them. Returns the number of summaries this run removes."""
    if plan.then is not None:
        return 0  # the follow-up asked for rebuilds (or reuses) them
    if not rerun:
        for (ttype, _), tid in sorted(reusable.items(), key=lambda item: item[1]):
            if ttype != DATAFLOW:
                kept.append(_reuse(conn, q, tid, batch_id, plan, None, None)[0])
        return 0
    summaries = int(_one(conn, q.summary_count, doc_id) or 0)
    if summaries and not plan.force:
        raise DocumentError(f"document {doc_id} has {summaries} RAPTOR summaries of chunks this call re-parses; "
                            "add --then raptor to rebuild them, or --force to remove them")
    return summaries


@dataclass(frozen=True)
class DocumentRow:
    """One document as `jobq docs` lists it (the document_progress view)."""

    doc_id: int
    name: str
    pages: int
    status: str
    progress: float
    tasks: int
    done: int
    chunks: int
    tokens: int
    summaries: int
    batch_id: int | None
    duration: float | None


def list_documents(*, batch: int | None = None, owner: str | None = None, status: str | None = None,
                   limit: int = 50, url: str | None = None, settings: Settings | None = None) -> list[DocumentRow]:
    """Documents, most recently enqueued first, with their state; every filter is optional."""
    settings = settings or get_settings()
    client = Client(url, settings=settings)
    with connect(client.url) as conn:
        rows = fetch(conn, sql(settings.schema_name).list_documents, batch, owner, status, limit)
    return [DocumentRow(*row) for row in rows]


__all__ = ["BatchResult", "Blob", "DocumentRow", "FileResult", "enqueue_files", "list_documents", "prepare"]
