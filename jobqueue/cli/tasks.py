"""Producer commands: enqueue, status, ls, cancel, retry, prioritize (by id, document or selector)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer

from jobqueue.cli.app import client, err, fail, import_task_modules, out, reading
from jobqueue.states import Status

STATUS_STYLES: dict[str, str] = {
    Status.DONE: "green", Status.FAILED: "red", Status.CANCELLED: "yellow", Status.RUNNING: "cyan"}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""
    for command in (enqueue, status, ls, cancel, retry, prioritize):
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
    imports: Annotated[list[str] | None, typer.Option(
        "--import", "-i", help="Module declaring or registering task types, to validate --payload (repeatable; "
        "adds to JOBQ_IMPORTS).")] = None,
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

    data = _parse_payload(payload)
    # A type nobody here registered or declared is accepted (its workers live elsewhere); one that an
    # imported module knows has its payload validated.
    import_task_modules(imports or [])
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
    row = t.model_dump()
    if row.get("from_page") is not None and row.get("to_page") is not None:
        # Pages as printed (1-based, last included); the row stores 0-based with the end excluded.
        row["pages"] = f"{row['from_page'] + 1}-{row['to_page']}"
        del row["from_page"], row["to_page"]
    for k, v in row.items():
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

    from jobqueue.client.fields import list_params

    for s in status or []:
        if s not in {x.value for x in Status}:
            fail(f"unknown status {s!r} (one of: {', '.join(Status)})")
    params = list_params(status, type, owner, doc, label, None, limit)
    # Plain rows on one connection, not Client.list: no client and no pydantic models to import, which
    # were most of this command's start-up (python -m bench startup).
    with reading() as (db, q):
        tasks = db.fetch(q.list, params)
        waiting_on = {t["type"] for t in tasks if t["status"] == Status.QUEUED}
        queues = db.fetch(q.queues) if waiting_on else []
    table = Table(title=f"{len(tasks)} task(s)")
    for col in ("id", "type", "status", "prio", "progress", "tries", "age", "last message"):
        table.add_column(col, overflow="fold" if col == "last message" else "ellipsis")
    for t in tasks:
        last = t["progress_msg"].rsplit("\n", 1)[-1] if t["progress_msg"] else ""
        table.add_row(str(t["id"]), Text(t["type"]),
                      Text(t["status"], style=STATUS_STYLES.get(t["status"], "white")), str(t["priority"]),
                      f"{t['progress']:.0%}" if t["progress"] >= 0 else "error", str(t["retry_count"]),
                      _age(t["created_at"]), Text(last[:80]))
    out.print(table)
    if waiting_on:  # why listed tasks may not move: a paused queue, or a type no live worker serves
        from jobqueue.cli.queues import notes

        for line in notes(queues, waiting_on):
            out.print(line)


# The filters every bulk command takes (one selector: each given filter must match).
TypeSel = Annotated[str | None, typer.Option("--type", "-t", help="Select by task type.")]
OwnerSel = Annotated[str | None, typer.Option("--owner", help="Select by owner.")]
BatchSel = Annotated[int | None, typer.Option("--batch", help="Select by batch id.")]
LabelSel = Annotated[str | None, typer.Option("--label", help="Select by label.")]
DocSel = Annotated[int | None, typer.Option("--doc", help="Select by document id.")]
StatusSel = Annotated[list[str] | None, typer.Option("--status", "-s", help="Select by status (repeatable).")]
_SHOWN = 50  # tasks listed one per line; a bigger bulk action prints the first ones and a count


def _selector(**filters: Any) -> dict[str, Any]:
    """The filters that were given, as the client's keyword arguments."""
    return {k: v for k, v in filters.items() if v is not None and v != []}


def _described(sel: dict[str, Any]) -> str:
    flags = {"type": "--type", "owner": "--owner", "batch_id": "--batch", "label": "--label", "doc_id": "--doc"}
    words = [f"{flags[k]} {v}" for k, v in sel.items() if k in flags]
    return " ".join([*words, *(f"--status {s}" for s in sel.get("status") or [])])


def _report(result: dict[int, str], notes: dict[str, str]) -> None:
    for tid, st in sorted(result.items())[:_SHOWN]:
        out.print(f"{tid}: {notes.get(st, f'already {st}')}", highlight=False)
    if len(result) > _SHOWN:
        counts = ", ".join(f"{n} {notes.get(st, st)}" for st in sorted(set(result.values()))
                           if (n := sum(1 for v in result.values() if v == st)))
        out.print(f"... {len(result) - _SHOWN} more; {len(result)} task(s) in all: {counts}", highlight=False)


def _by_selector(task_ids: list[int] | None, sel: dict[str, Any], what: str) -> bool:
    """Whether the command acts by selector; ids with filters, or nothing at all, are refused."""
    filters = {k for k in sel if k != "doc_id"}
    if task_ids and filters:
        fail("give task ids or a selector (--type, --owner, --batch, --label, --status), not both")
    if not task_ids and not sel:
        fail(f"give {what}, --doc DOC or a selector (--type, --owner, --batch, --label, --status); "
             "nothing is selected by default")
    return bool(filters)


_CANCEL_NOTES: dict[str, str] = {Status.CANCELLED: "cancelled", Status.RUNNING: "cancel requested; its worker stops it"}
_RETRY_NOTES: dict[str, str] = {Status.QUEUED: "queued", Status.WAITING: "waiting (until its parents are done)"}


def cancel(
    task_ids: Annotated[list[int] | None, typer.Argument(help="Task ids.", show_default=False)] = None,
    doc: DocSel = None, type: TypeSel = None, owner: OwnerSel = None, batch: BatchSel = None,
    label: LabelSel = None, status: StatusSel = None,
) -> None:
    """Cancel tasks by id, document or selector (one statement): queued ones at once, running ones
    through their worker. A selector that matches nothing is not an error (exit 0)."""
    sel = _selector(doc_id=doc, type=type, owner=owner, batch_id=batch, label=label, status=status)
    if _by_selector(task_ids, sel, "task ids"):
        result = client().cancel_where(**sel)
        if not result:
            out.print(f"nothing to cancel: no live task matches {_described(sel)}", highlight=False)
    else:
        c = client()
        result = c.cancel(task_ids or [], doc_id=doc)
        if not result and doc is not None:
            # Like an unknown task id: a mistyped document id is an error, not "nothing to cancel".
            if not c.list(doc_id=doc, limit=1):
                fail(f"no task belongs to document {doc}")
            out.print(f"nothing to cancel: every task of document {doc} has finished")
        elif not result:
            out.print("nothing to cancel")
    _report(result, _CANCEL_NOTES)


def retry(
    task_id: Annotated[int | None, typer.Argument(help="Task id.", show_default=False)] = None,
    doc: DocSel = None, type: TypeSel = None, owner: OwnerSel = None, batch: BatchSel = None,
    label: LabelSel = None, status: StatusSel = None,
) -> None:
    """Requeue failed or cancelled tasks (by id, document or selector) with a fresh set of retries
    (waiting while a parent is not done). A selector that matches nothing is not an error (exit 0)."""
    sel = _selector(doc_id=doc, type=type, owner=owner, batch_id=batch, label=label, status=status)
    if _by_selector(None if task_id is None else [task_id], sel, "a task id"):
        result = client().retry_where(**sel)
        if not result:
            out.print(f"nothing to retry: no failed or cancelled task matches {_described(sel)}", highlight=False)
    else:
        result = client().retry(task_id, doc_id=doc)
    _report(result, _RETRY_NOTES)


def prioritize(
    values: Annotated[list[int], typer.Argument(
        help="[TASK_ID...] PRIORITY: the new priority last (higher runs first; after -- when negative).",
        show_default=False)],
    doc: DocSel = None, type: TypeSel = None, owner: OwnerSel = None, batch: BatchSel = None,
    label: LabelSel = None, status: StatusSel = None,
) -> None:
    """Give queued and waiting tasks (by id, document or selector) a new priority: the next claim takes
    them in that order. A selector that matches nothing is not an error (exit 0)."""
    *task_ids, priority = values
    sel = _selector(doc_id=doc, type=type, owner=owner, batch_id=batch, label=label, status=status)
    _by_selector(task_ids, sel, "task ids")
    changed = client().prioritize(task_ids, priority=priority, **sel)
    if not changed:
        out.print(f"nothing to reprioritise: no queued or waiting task matches {_described(sel)}", highlight=False)
        return
    shown = ", ".join(map(str, changed[:_SHOWN])) + (f" ... ({len(changed) - _SHOWN} more)" if len(changed) > _SHOWN
                                                     else "")
    out.print(f"{len(changed)} task(s) now at priority {priority}: {shown}", highlight=False)
