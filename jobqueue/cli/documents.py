"""Document commands: `jobq watch` (live progress) and `jobq docs` (the documents and their state)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""
    app.command()(watch)
    app.command()(docs)


def watch(
    targets: Annotated[list[str], typer.Argument(help="doc:N, task:N, batch:N, or a document id.",
                                                 show_default=False)],
) -> None:
    """Show live progress bars until everything watched has finished (exit 1 if anything failed)."""
    from jobq_workers.watch import parse_target
    from jobq_workers.watch import watch as run
    from jobqueue.cli.app import ensure_schema, out

    parsed = [parse_target(t) for t in targets]
    ensure_schema()
    raise typer.Exit(run(parsed, console=out))


def docs(
    batch: Annotated[int | None, typer.Option(help="Only this batch's documents.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner's documents.")] = None,
    status: Annotated[str | None, typer.Option(help="Only documents in this state.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 50,
) -> None:
    """List documents, newest first, with their status, progress and chunk counts."""
    from rich.table import Table
    from rich.text import Text

    from jobq_workers.watch import COLORS
    from jobqueue.cli.app import ensure_schema, fail, out
    from jobqueue.db.connect import connect
    from jobqueue.settings import get_settings

    if status is not None and status not in COLORS:
        fail(f"unknown status {status!r} (one of: {', '.join(COLORS)})")
    ensure_schema()
    s = get_settings().schema_name
    with connect() as conn:
        rows = conn.execute(
            f"""SELECT doc_id, name, pages, status, progress, tasks, done, chunks, summaries, batch_id,
                       duration
                FROM {s}.document_progress
                WHERE (%(b)s::bigint IS NULL OR batch_id = %(b)s) AND (%(o)s::text IS NULL OR owner = %(o)s)
                  AND (%(st)s::text IS NULL OR status = %(st)s)
                ORDER BY doc_id DESC LIMIT %(n)s""",
            {"b": batch, "o": owner, "st": status, "n": limit}).fetchall()
    table = Table(title=f"{len(rows)} document(s)")
    for col in ("id", "name", "pages", "status", "progress", "tasks", "chunks", "summaries", "batch", "took"):
        table.add_column(col, overflow="fold" if col == "name" else "ellipsis", no_wrap=col != "name",
                         min_width=16 if col == "name" else None,
                         justify="left" if col in ("name", "status") else "right")
    for doc_id, name, pages, st, progress, tasks, done, chunks, summaries, batch_id, took in rows:
        table.add_row(str(doc_id), Text(name), str(pages), Text(st, style=COLORS.get(st, "white")),
                      f"{max(progress, 0):.0%}", f"{done}/{tasks}", str(chunks), str(summaries),
                      str(batch_id or ""), f"{took:.1f}s" if took is not None else "")
    out.print(table)
