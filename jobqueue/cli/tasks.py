"""Producer commands: enqueue, status, ls, cancel, retry."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer

from jobqueue.cli.app import client, err, fail, out
from jobqueue.states import Status

STATUS_STYLES: dict[str, str] = {
    Status.DONE: "green", Status.FAILED: "red", Status.CANCELLED: "yellow", Status.RUNNING: "cyan"}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""
    for command in (enqueue, status, ls, cancel, retry):
        app.command()(command)


def _parse_payload(text: str) -> Any:
    from jobqueue.errors import InvalidPayload

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidPayload(
            f"--payload is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


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
    run_at: Annotated[str | None, typer.Option(
        help="When the task may run: an ISO time (UTC unless it has an offset) or +DURATION (+90s, +10m, +2h).")]
    = None,
    depends_on: Annotated[str | None, typer.Option(help="Parent task ids (ID[,ID...]): run after them.")] = None,
    run_on: Annotated[str | None, typer.Option(
        help="With --depends-on: success (default), always or failure (a callback of the parents).")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="Label of the task (repeatable).")]
    = None,
) -> None:
    """Enqueue a plain task (--type/--payload) or documents (FILE...)."""
    if files:
        if type is not None:
            fail("give documents or --type, not both")
        if run_at or depends_on or run_on or label:
            fail("--run-at, --depends-on, --run-on and --label are for a plain task (--type)")
        from jobqueue.cli.documents import enqueue_files_cli

        code = enqueue_files_cli(
            files, parser=parser, page_size=page_size, pages=pages, priority=priority or 0, then=then,
            owner=owner, by_reference=by_reference, force=force, wait=wait, console=out, errors=err,
        )
        raise typer.Exit(code)
    if type is None:
        fail("nothing to enqueue: give document files, or --type and --payload")
    from jobqueue import registry

    data = _parse_payload(payload)
    registry.get_type(type)
    task_id = client().enqueue(type, data, priority=priority, delay=delay, dedupe_key=dedupe_key,
                               max_retries=max_retries, owner=owner, run_at=_parse_run_at(run_at),
                               depends_on=_parse_ids(depends_on), run_on=run_on, labels=label)
    out.print(task_id)


def _parse_run_at(text: str | None) -> datetime | None:
    """--run-at: an ISO time, or +DURATION from now."""
    if text is None:
        return None
    from datetime import UTC, timedelta

    from jobqueue.cli.observe import parse_duration
    from jobqueue.errors import InvalidPayload

    if text.strip().startswith("+"):
        try:
            return datetime.now(UTC) + timedelta(seconds=parse_duration(text.strip()[1:]))
        except typer.BadParameter as exc:
            raise InvalidPayload(f"--run-at: {exc}") from None
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidPayload(f"--run-at {text!r} is neither an ISO time (2026-12-24T18:00) nor +DURATION (+10m)"
                             ) from None


def _parse_ids(text: str | None) -> list[int] | None:
    """--depends-on: ID[,ID...]."""
    if text is None:
        return None
    from jobqueue.errors import InvalidPayload

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidPayload(f"--depends-on {text!r} must be task ids separated by commas (e.g. 12,15)") from None


def status(task_id: Annotated[int, typer.Argument(help="Task id.")],
           as_json: Annotated[bool, typer.Option("--json", help="Print the row as JSON.")] = False) -> None:
    """Show one task."""
    from rich.table import Table
    from rich.text import Text

    t = client().get(task_id)
    if as_json:
        out.print_json(t.model_dump_json())
        return
    table = Table(show_header=False, box=None)
    for k, v in t.model_dump().items():
        if v is None or v == [] or v == "":
            continue
        table.add_row(Text(k, style="bold"), Text(json.dumps(v) if isinstance(v, dict | list) else str(v)))
    out.print(table)


def _age(ts: datetime | None) -> str:
    if ts is None:
        return ""
    secs = (datetime.now(ts.tzinfo) - ts).total_seconds()
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(secs) >= n:
            return f"{secs / n:.0f}{unit}"
    return f"{secs:.0f}s"


def ls(
    status: Annotated[list[str] | None, typer.Option("--status", "-s", help="Filter by status (repeatable).")] = None,
    type: Annotated[list[str] | None, typer.Option("--type", "-t", help="Filter by type (repeatable).")] = None,
    owner: Annotated[str | None, typer.Option(help="Filter by owner.")] = None,
    doc: Annotated[int | None, typer.Option(help="Filter by document id.")] = None,
    label: Annotated[str | None, typer.Option("--label", "-l", help="Filter by label.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 50,
) -> None:
    """List tasks, newest first."""
    from rich.table import Table
    from rich.text import Text

    for s in status or []:
        if s not in {x.value for x in Status}:
            fail(f"unknown status {s!r} (one of: {', '.join(Status)})")
    tasks = client().list(status=status, type=type, owner=owner, doc_id=doc, label=label, limit=limit)
    table = Table(title=f"{len(tasks)} task(s)")
    for col in ("id", "type", "status", "prio", "progress", "tries", "age", "last message"):
        table.add_column(col, overflow="fold" if col == "last message" else "ellipsis")
    for t in tasks:
        last = t.progress_msg.rsplit("\n", 1)[-1] if t.progress_msg else ""
        table.add_row(str(t.id), Text(t.type), Text(t.status, style=STATUS_STYLES.get(t.status, "white")),
                      str(t.priority), f"{t.progress:.0%}" if t.progress >= 0 else "error", str(t.retry_count),
                      _age(t.created_at), Text(last[:80]))
    out.print(table)


def cancel(
    task_ids: Annotated[list[int] | None, typer.Argument(help="Task ids.", show_default=False)] = None,
    doc: Annotated[int | None, typer.Option("--doc", help="Cancel every task of this document.")] = None,
) -> None:
    """Cancel tasks: queued ones at once, running ones through their worker."""
    if not task_ids and doc is None:
        fail("give task ids or --doc DOC")
    result = client().cancel(task_ids or [], doc_id=doc)
    if not result:
        out.print("nothing to cancel")
    for tid, st in sorted(result.items()):
        notes: dict[str, str] = {Status.CANCELLED: "cancelled", Status.RUNNING: "cancel requested; its worker stops it"}
        note = notes.get(st, f"already {st}")
        out.print(f"{tid}: {note}", highlight=False)


def retry(
    task_id: Annotated[int | None, typer.Argument(help="Task id.", show_default=False)] = None,
    doc: Annotated[int | None, typer.Option("--doc", help="Retry every failed or cancelled task of this document.")]
    = None,
) -> None:
    """Requeue failed or cancelled tasks with a fresh set of retries (waiting while a parent is not done)."""
    if task_id is None and doc is None:
        fail("give a task id or --doc DOC")
    for tid, st in sorted(client().retry(task_id, doc_id=doc).items()):
        out.print(f"{tid}: {st}" + (" (until its parents are done)" if st == Status.WAITING else ""), highlight=False)
