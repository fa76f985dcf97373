"""The ``jobq`` command line.

Every error a user can cause is one readable line on stderr and a non-zero exit, never a traceback:
:func:`main` turns every :class:`JobqError` (and the database driver's own errors) into that line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jobqueue import registry
from jobqueue.db.connect import is_embedded, redact, redact_text
from jobqueue.errors import InvalidPayload
from jobqueue.settings import get_settings

app = typer.Typer(
    name="jobq",
    help="jobq: a durable job queue whose broker is PostgreSQL. The tasks table is the queue.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="The embedded PostgreSQL server (used when JOBQ_DATABASE_URL is not set).",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console()
err = Console(stderr=True)


def error_line(message: str) -> None:
    """The one line every user error ends in; the message is text, never rich markup."""
    err.print(f"[bold red]error:[/] {escape(redact_text(message))}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    error_line(message)
    raise typer.Exit(code)


@app.callback()
def _global(
    database_url: Annotated[str | None, typer.Option(
        "--database-url", envvar="JOBQ_DATABASE_URL", show_envvar=True,
        help="PostgreSQL URL; without one, the embedded server is used.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    if database_url:
        os.environ["JOBQ_DATABASE_URL"] = database_url
    get_settings.cache_clear()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _client() -> Any:
    from jobqueue.client.sync import Client

    ensure_schema()
    return Client()


def ensure_schema() -> None:
    """The embedded server is migrated on demand; a real server must have been migrated."""
    from jobqueue.admin.embedded import start_if_needed
    from jobqueue.admin.migrate import migrate
    from jobqueue.db.connect import check_schema, connect

    settings = get_settings()
    url = start_if_needed(settings)  # the library never starts the embedded server: the CLI does, here
    if is_embedded(settings):
        from jobqueue.errors import SchemaMissing

        try:
            with connect(url) as conn:
                check_schema(conn, settings.schema_name)
                return
        except SchemaMissing:
            migrate(url)
            return
    with connect(url) as conn:
        check_schema(conn, settings.schema_name)


# ---------------------------------------------------------------- schema


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Create or upgrade jobq's schema (safe to run from many processes at once)."""
    from jobqueue.admin.migrate import current
    from jobqueue.admin.migrate import migrate as run

    run(revision=revision)
    out.print(f"schema [bold]{get_settings().schema_name}[/] at revision {current()}")


# ---------------------------------------------------------------- producer commands


def _parse_payload(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidPayload(
            f"--payload is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


@app.command()
def enqueue(
    files: Annotated[list[str] | None, typer.Argument(help="Documents to ingest (PDF, CSV, XLSX, TXT, MD, HTML, DOCX).",
                                                        show_default=False)] = None,
    type: Annotated[str | None, typer.Option("--type", "-t", help="Task type of a plain task.")] = None,
    payload: Annotated[str, typer.Option("--payload", "-p", help="JSON payload of a plain task.")] = "{}",
    priority: Annotated[int | None, typer.Option(help="Higher runs first.")] = None,
    delay: Annotated[float | None, typer.Option(help="Seconds before the task may run.")] = None,
    dedupe_key: Annotated[str | None, typer.Option(help="At most one live task per key.")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Retries after the first attempt.")] = None,
    owner: Annotated[str | None, typer.Option(help="Owner recorded on the task(s) / document(s).")] = None,
    parser: Annotated[str, typer.Option(help="Document parser: general, paper, book, table, one.")] = "general",
    page_size: Annotated[int | None, typer.Option(help="Pages per task (default 12; 22 for paper).")] = None,
    pages: Annotated[str | None, typer.Option(help="Page ranges to process, e.g. 1-20,30-40.")] = None,
    then: Annotated[str | None, typer.Option(help="Task type to run per document after all its tasks.")] = None,
    by_reference: Annotated[bool, typer.Option(help="Store only the file's path, not its bytes.")] = False,
    force: Annotated[bool, typer.Option(help="Reprocess even unchanged ranges.")] = False,
    wait: Annotated[bool, typer.Option(help="Watch the documents until they finish.")] = False,
) -> None:
    """Enqueue a plain task (--type/--payload) or documents (FILE...)."""
    if files:
        if type is not None:
            fail("give documents or --type, not both")
        from jobq_workers.documents import enqueue_files_cli

        code = enqueue_files_cli(
            files, parser=parser, page_size=page_size, pages=pages, priority=priority or 0, then=then,
            owner=owner, by_reference=by_reference, force=force, wait=wait, console=out, errors=err,
        )
        raise typer.Exit(code)
    if type is None:
        fail("nothing to enqueue: give document files, or --type and --payload")
    data = _parse_payload(payload)
    registry.get_type(type)
    task_id = _client().enqueue(type, data, priority=priority, delay=delay, dedupe_key=dedupe_key,
                                max_retries=max_retries, owner=owner)
    out.print(task_id)


@app.command()
def status(task_id: Annotated[int, typer.Argument(help="Task id.")],
           as_json: Annotated[bool, typer.Option("--json", help="Print the row as JSON.")] = False) -> None:
    """Show one task."""
    t = _client().get(task_id)
    if as_json:
        out.print_json(t.model_dump_json())
        return
    table = Table(show_header=False, box=None)
    for k, v in t.model_dump().items():
        if v is None or v == [] or v == "":
            continue
        table.add_row(f"[bold]{k}[/]", json.dumps(v) if isinstance(v, dict | list) else str(v))
    out.print(table)


def _age(ts: datetime | None) -> str:
    if ts is None:
        return ""
    secs = (datetime.now(ts.tzinfo) - ts).total_seconds()
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(secs) >= n:
            return f"{secs / n:.0f}{unit}"
    return f"{secs:.0f}s"


@app.command("ls")
def ls(
    status: Annotated[list[str] | None, typer.Option("--status", "-s", help="Filter by status (repeatable).")] = None,
    type: Annotated[list[str] | None, typer.Option("--type", "-t", help="Filter by type (repeatable).")] = None,
    owner: Annotated[str | None, typer.Option(help="Filter by owner.")] = None,
    doc: Annotated[int | None, typer.Option(help="Filter by document id.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 50,
) -> None:
    """List tasks, newest first."""
    from jobqueue.states import Status

    for s in status or []:
        if s not in {x.value for x in Status}:
            fail(f"unknown status {s!r} (one of: {', '.join(x.value for x in Status)})")
    tasks = _client().list(status=status, type=type, owner=owner, doc_id=doc, limit=limit)
    table = Table(title=f"{len(tasks)} task(s)")
    for col in ("id", "type", "status", "prio", "progress", "tries", "age", "last message"):
        table.add_column(col, overflow="fold" if col == "last message" else "ellipsis")
    colors = {"done": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}
    for t in tasks:
        last = t.progress_msg.rsplit("\n", 1)[-1] if t.progress_msg else ""
        table.add_row(str(t.id), t.type, f"[{colors.get(t.status, 'white')}]{t.status}[/]", str(t.priority),
                      f"{t.progress:.0%}" if t.progress >= 0 else "error", str(t.retry_count),
                      _age(t.created_at), last[:80])
    out.print(table)


@app.command()
def cancel(
    task_ids: Annotated[list[int] | None, typer.Argument(help="Task ids.", show_default=False)] = None,
    doc: Annotated[int | None, typer.Option("--doc", help="Cancel every task of this document.")] = None,
) -> None:
    """Cancel tasks: queued ones at once, running ones through their worker."""
    if not task_ids and doc is None:
        fail("give task ids or --doc DOC")
    result = _client().cancel(task_ids or [], doc_id=doc)
    if not result:
        out.print("nothing to cancel")
    for tid, st in sorted(result.items()):
        note = {"cancelled": "cancelled", "running": "cancel requested; its worker stops it"}.get(
            st, f"already {st}")
        out.print(f"{tid}: {note}")


@app.command()
def retry(task_id: Annotated[int, typer.Argument(help="Task id.")]) -> None:
    """Requeue a failed or cancelled task with a fresh set of retries."""
    _client().retry(task_id)
    out.print(f"{task_id}: queued")


# ---------------------------------------------------------------- worker


@app.command()
def worker(
    types: Annotated[str, typer.Option("--types", "-t", help="Comma-separated task types to run.")],
    concurrency: Annotated[int | None, typer.Option(help="Tasks run at once by this process.")] = None,
    burst: Annotated[bool, typer.Option(help="Exit 0 once no task of these types is runnable.")] = False,
    name: Annotated[str | None, typer.Option(help="Worker id (default host:pid:random).")] = None,
    grace: Annotated[float | None, typer.Option(help="Seconds running tasks get after SIGTERM.")] = None,
    poll: Annotated[float | None, typer.Option(help="Fallback poll interval in seconds.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    isolation: Annotated[str, typer.Option(
        help="thread: sync handlers in threads (unless @task says process); process: every sync handler "
             "in a child process that a cancel or timeout kills (one task per child).")] = "thread",
    imports: Annotated[list[str] | None, typer.Option(
        "--import", "-i", help="Module that registers task types (repeatable; also JOBQ_IMPORTS).")] = None,
) -> None:
    """Run task handlers: `jobq worker --types dataflow,raptor`."""
    from jobqueue.runtime.worker import run_worker

    registry.import_modules([*(imports or []), *get_settings().imports])
    wanted = [t.strip() for t in types.split(",") if t.strip()]
    if not wanted:
        fail("--types needs at least one task type")
    for t in wanted:
        registry.get_type(t)
    if isolation not in ("thread", "process"):
        fail("--isolation must be thread or process")
    if concurrency is not None and concurrency < 1:
        fail("--concurrency must be at least 1")
    ensure_schema()  # an unreachable database at start is one error line, not a retry loop
    if metrics_port is not None:
        from jobqueue.observe.metrics import serve

        serve(metrics_port)
    started = time.monotonic()
    code, stats = run_worker(wanted, concurrency=concurrency, burst=burst, name=name, grace_seconds=grace,
                             poll_seconds=poll, isolation=isolation)
    out.print(f"worker stopped after {time.monotonic() - started:.1f}s: {stats.done} done, {stats.failed} failed, "
              f"{stats.retried} retried, {stats.cancelled} cancelled, {stats.rescued} rescued", highlight=False)
    raise typer.Exit(code)


# ---------------------------------------------------------------- embedded server


@db_app.command("status")
def db_status() -> None:
    """Is the embedded server running, where, and on which URL."""
    from jobqueue.admin import embedded

    settings = get_settings()
    info = embedded.read_running(embedded.pgdata_dir(settings.home))
    if settings.database_url:
        out.print(f"JOBQ_DATABASE_URL is set ({redact(settings.database_url)}): the embedded server is not used")
    if info is None:
        out.print(f"embedded server: stopped (data dir {embedded.pgdata_dir(settings.home)})")
        raise typer.Exit(3)
    out.print(f"embedded server: running, pid {info.pid}, data dir {info.pgdata}\nurl: {info.url()}")


@db_app.command("start")
def db_start() -> None:
    """Start the embedded server (creating it on first use) and migrate it."""
    from jobqueue.admin import embedded
    from jobqueue.admin.migrate import migrate as run

    info = embedded.ensure_running(get_settings().home)
    run(info.url())
    out.print(f"embedded server running, pid {info.pid}\nurl: {info.url()}")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded server."""
    from jobqueue.admin import embedded

    stopped = embedded.stop(get_settings().home)
    out.print("stopped" if stopped else "not running")


@db_app.command("url")
def db_url() -> None:
    """Print the URL jobq uses (starting the embedded server if needed): `psql "$(jobq db url)"`."""
    from jobqueue.admin.embedded import start_if_needed

    print(redact(start_if_needed(get_settings())))
