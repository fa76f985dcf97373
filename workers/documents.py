"""Documents in, tasks out: store each file, split it into page/row-range tasks, reuse what is unchanged.

Every file is checked (readable, supported, not encrypted or corrupt, within the size limit, with
something to split) before anything is written, and then written under a savepoint of its own, so a
bad file gets one error line and leaves no row behind while the other files of the call enqueue.

A document is its content (per owner): enqueueing the same bytes again re-parses that document.
Each task carries a digest of the content, its settings and its range; a task whose digest matches a
finished task of the previous run is recorded done at once and takes over that task's chunks, so
only what changed runs again (``force`` reprocesses everything). The previous run's other tasks and
chunks are deleted, as RAGFlow does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.text import Text

from jobqueue import registry
from jobqueue.client.sync import Client, TaskSpec
from jobqueue.db.connect import connect, resolve_url
from jobqueue.errors import DocumentError, JobqError
from jobqueue.settings import Settings, get_settings
from jobqueue.states import LIVE

from . import splitter

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
    model = registry.get_type(task_type).payload
    return model.model_validate(data).model_dump(mode="json") if model is not None else data


def _stamp(line: str) -> str:
    return f"{datetime.now().strftime('%H:%M:%S')} {line}"


def _range_prefix(lo: int | None, hi: int | None) -> str:
    return f"Page({lo + 1}~{hi}): " if lo is not None and hi is not None else ""


def prepare(path: str, plan: _Plan, settings: Settings) -> _Prepared:
    """Read and check one file; raises DocumentError with the reason (without the path)."""
    p = Path(path)
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
    try:
        fmt = splitter.detect_format(p.name, data)
        kind = splitter.detect_kind(p.name, data)
        units = splitter.count_units(kind, data, name=p.name)
        ranges = splitter.split(kind, units, parser=plan.parser, page_size=plan.page_size,
                                pages=plan.pages if kind == "pdf" else None)
    except ValueError as exc:  # UnsupportedDocument included
        raise DocumentError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return _Prepared(path, p.name, data, fmt, kind, units, ranges, splitter.content_digest(data),
                     str(p.resolve()) if plan.by_reference else None)


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

    Raises :class:`DocumentError` only for a bad option, before anything is read or written.
    """
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

    url = url or resolve_url(settings)
    client = Client(url, settings=settings)
    s = settings.schema_name
    results: list[FileResult] = []
    with connect(url, autocommit=True) as conn, conn.transaction():
        batch_id = int(_one(conn, f"INSERT INTO {s}.batches (owner, requested) VALUES (%s, %s) RETURNING id",
                            (owner, len(paths))))
        for item in prepared:
            if isinstance(item, FileResult):
                results.append(item)
                continue
            try:
                with conn.transaction():
                    results.append(_store(conn, client, item, batch_id, plan, s))
            except JobqError as exc:
                results.append(FileResult(item.path, error=str(exc)))
            except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
                results.append(FileResult(item.path, error=f"rejected by the database: {str(exc).splitlines()[0]}"))
        conn.execute(f"UPDATE {s}.batches SET rejected = %s WHERE id = %s",
                     (sum(1 for r in results if not r.ok), batch_id))
    return BatchResult(batch_id, results)


def _one(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _document_row(conn: psycopg.Connection[Any], prep: _Prepared, batch_id: int, plan: _Plan, s: str) -> int:
    """Insert the document, or lock and update the existing one with the same content."""
    find = (f"SELECT id, content IS NOT NULL FROM {s}.documents "
            "WHERE COALESCE(owner, '') = COALESCE(%s, '') AND content_digest = %s FOR UPDATE")
    row = conn.execute(find, (plan.owner, prep.content_digest)).fetchone()
    meta = (batch_id, prep.name, len(prep.data), prep.format, prep.kind, plan.parser, prep.units)
    if row is None:
        new_id = _one(conn, f"""
            INSERT INTO {s}.documents (batch_id, name, size, format, kind, parser, pages, content_digest,
                                       content, uri, owner)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT ((COALESCE(owner, '')), content_digest) DO NOTHING RETURNING id""",
            (*meta, prep.content_digest, None if prep.uri else prep.data, prep.uri, plan.owner))
        if new_id is not None:
            return int(new_id)
        row = conn.execute(find, (plan.owner, prep.content_digest)).fetchone()  # a concurrent call won
        assert row is not None
    doc_id, stored = int(row[0]), bool(row[1])
    live = _one(conn, f"SELECT count(*) FROM {s}.tasks WHERE doc_id = %s AND status = ANY(%s)", (doc_id, list(LIVE)))
    if live:
        raise DocumentError(f"document {doc_id} has the same content and is still being processed ({live} live "
                            f"task(s)); wait for it or run `jobq cancel --doc {doc_id}`")
    # The bytes travel again only when the storage mode changes.
    storage, params = ("content = NULL, uri = %s", [prep.uri]) if prep.uri else (
        ("uri = uri", []) if stored else ("content = %s, uri = NULL", [prep.data]))
    conn.execute(f"""UPDATE {s}.documents SET batch_id = %s, name = %s, size = %s, format = %s, kind = %s,
                     parser = %s, pages = %s, {storage}, updated_at = now() WHERE id = %s""",
                 (*meta, *params, doc_id))
    return doc_id


def _reuse(conn: psycopg.Connection[Any], s: str, old_id: int, batch_id: int, plan: _Plan,
           lo: int | None, hi: int | None) -> tuple[int, int]:
    """Record a new task done at once with the chunks of finished task `old_id`; returns (id, chunks)."""
    new_id = int(_one(conn, f"""
        INSERT INTO {s}.tasks (type, priority, payload, status, progress, finished_at, process_duration, doc_id,
                               batch_id, from_page, to_page, owner, digest, result, max_retries, labels)
        SELECT type, %s, payload, 'done', 1, now(), 0, doc_id, %s, from_page, to_page, %s, digest, result,
               max_retries, labels
        FROM {s}.tasks WHERE id = %s RETURNING id""", (plan.priority, batch_id, plan.owner, old_id)))
    moved = conn.execute(f"UPDATE {s}.chunks SET task_id = %s WHERE task_id = %s", (new_id, old_id)).rowcount
    line = _stamp(f"{_range_prefix(lo, hi)}Reused {moved} chunk(s) of task {old_id}: content and settings unchanged.")
    conn.execute(f"UPDATE {s}.tasks SET progress_msg = %s WHERE id = %s", (line, new_id))
    return new_id, moved


def _store(conn: psycopg.Connection[Any], client: Client, prep: _Prepared, batch_id: int, plan: _Plan,
           s: str) -> FileResult:
    doc_id = _document_row(conn, prep, batch_id, plan, s)
    reusable: dict[tuple[str, str], int] = {}
    if not plan.force:
        for tid, ttype, digest in conn.execute(
                f"SELECT id, type, digest FROM {s}.tasks WHERE doc_id = %s AND status = 'done' AND digest IS NOT NULL "
                "ORDER BY id", (doc_id,)).fetchall():
            reusable[(ttype, digest)] = tid

    kept: list[int] = []
    flow_ids: list[int] = []
    specs: list[TaskSpec] = []
    for lo, hi in prep.ranges:
        digest = splitter.task_digest(prep.content_digest, {"type": DATAFLOW, **plan.payload}, lo, hi)
        old = reusable.get((DATAFLOW, digest))
        if old is not None:
            new_id, _ = _reuse(conn, s, old, batch_id, plan, lo, hi)
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
            then_id, _ = _reuse(conn, s, old, batch_id, plan, None, None)
            kept.append(then_id)
    # The previous run's other tasks go, and with them whatever chunks no reused task took over.
    conn.execute(f"SELECT {s}.replace_document_run(%s, %s::bigint[])", (doc_id, kept))
    new_ids = client.enqueue_many(DATAFLOW, specs, connection=conn) if specs else []
    flow_ids.extend(new_ids)
    if plan.then and then_id is None:
        then_id = client.enqueue(plan.then, plan.then_payload, priority=plan.priority, doc_id=doc_id,
                                 batch_id=batch_id, owner=plan.owner, digest=then_digest,
                                 depends_on=sorted(flow_ids), connection=conn)
    queued = len(new_ids) + (1 if then_id is not None and then_id not in kept else 0)
    return FileResult(prep.path, doc_id=doc_id, tasks=sorted(flow_ids), reused=len(kept), queued=queued,
                      then_task=then_id)


def _describe(r: FileResult) -> str:
    parts = [f"{r.path}: document {r.doc_id}", f"{len(r.tasks)} task(s)"]
    if r.then_task is not None:
        parts.append(f"then task {r.then_task}")
    if r.reused:
        parts.append(f"{r.reused} reused")
    parts.append(f"{r.queued} to run" if r.queued else "nothing to run")
    return ", ".join(parts)


def enqueue_files_cli(
    files: Sequence[str],
    *,
    parser: str,
    page_size: int | None,
    pages: str | None,
    priority: int,
    then: str | None,
    owner: str | None,
    by_reference: bool,
    force: bool,
    wait: bool,
    console: Console,
    errors: Console,
) -> int:
    """`jobq enqueue FILE...`: one line per file; exit 1 if any file was refused or (with --wait) failed."""
    import logging

    from jobqueue.cli.app import ensure_schema

    # pypdf logs its repairs of damaged files as warnings; the refusal line already says what is wrong.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    ensure_schema()
    result = enqueue_files(files, parser=parser, page_size=page_size, pages=pages, priority=priority, then=then,
                           owner=owner, by_reference=by_reference, force=force)
    for r in result.files:
        if r.error is not None:
            errors.print(Text.assemble(("error:", "bold red"), f" {r.path}: {r.error}"), soft_wrap=True)
        elif r.note is not None:
            console.print(Text(f"{r.path}: {r.note}"), soft_wrap=True)
        else:
            console.print(Text(_describe(r)), soft_wrap=True)
    code = 1 if result.errors else 0
    if result.batch_id is not None:
        ok = len(result.doc_ids)
        console.print(Text(f"batch {result.batch_id}: {ok} document(s) enqueued, {len(result.errors)} refused"),
                      soft_wrap=True)
        if wait and ok:
            from .watch import Target, watch

            code = max(code, watch([Target("doc", d) for d in result.doc_ids], console=console))
    return code


__all__ = ["BatchResult", "FileResult", "enqueue_files", "enqueue_files_cli", "prepare"]
