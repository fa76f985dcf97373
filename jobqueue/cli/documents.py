"""Document commands: `jobq enqueue FILE...` (its output), `jobq watch` (live progress) and `jobq docs`.

The pipeline (jobq_workers) decides what there is to show; this module is where it is drawn, so
rich stays in the CLI. The pipeline is imported inside the commands: other commands never pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.console import Console, Group
    from rich.table import Table
    from rich.text import Text

    from jobq_workers.documents import DocumentRow, FileResult
    from jobq_workers.watch import Row, Target

COLORS = {"done": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "queued": "white",
          "waiting": "magenta"}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app (`enqueue` itself lives in the base module)."""
    app.command()(watch)
    app.command()(docs)


# ---------------------------------------------------------------- enqueue FILE...


def _describe(r: FileResult) -> str:
    parts = [f"{r.path}: document {r.doc_id}", f"{len(r.tasks)} task(s)"]
    if r.then_task is not None:
        parts.append(f"then task {r.then_task}")
    if r.reused:
        parts.append(f"{r.reused} reused")
    parts.append(f"{r.queued} to run" if r.queued else "nothing to run")
    if r.summaries_removed:
        parts.append(f"{r.summaries_removed} RAPTOR summaries removed (--force)")
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

    from rich.text import Text

    from jobq_workers.documents import enqueue_files
    from jobq_workers.extras import require_document_stack
    from jobq_workers.watch import Target
    from jobqueue.cli.app import ensure_schema, settings

    require_document_stack()  # before the schema check: a light install learns what to install first
    # pypdf logs its repairs of damaged files as warnings; the refusal line already says what is wrong.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    s = settings()
    url = ensure_schema(s)
    result = enqueue_files(files, parser=parser, page_size=page_size, pages=pages, priority=priority, then=then,
                           owner=owner, by_reference=by_reference, force=force, url=url, settings=s)
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
            code = max(code, watch_targets([Target("doc", d) for d in result.doc_ids], console=console,
                                                 url=url))
    return code


# ---------------------------------------------------------------- watch


def _status(r: Row) -> Text:
    from rich.text import Text

    label = r.status
    if r.status == "queued" and r.ahead is not None:
        label = f"queued, {r.ahead} task(s) ahead" if r.ahead else "queued, next"
    return Text(label, style=COLORS.get(r.status, "white"))


def render(rows: Sequence[Row]) -> Group:
    """Two lines per target: the bar and state, then the newest progress message (cut to one line).

    Fixed column widths keep the bars aligned although every target is its own grid."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    parts: list[Table | Text] = []
    for r in rows:
        frac = max(r.progress, 0.0)
        line = Table.grid(padding=(0, 1))
        for width in (8, 18, 16, 4):
            line.add_column(width=width, no_wrap=True)
        line.add_column(min_width=9, no_wrap=True)
        line.add_column(no_wrap=True, overflow="ellipsis")
        chunks = f"{r.chunks} chunks" + (f" +{r.summaries} sum." if r.summaries else "")
        line.add_row(Text(r.key), Text(r.name, overflow="ellipsis"), ProgressBar(total=1.0, completed=frac, width=16),
                     f"{frac:4.0%}", _status(r), Text(chunks))
        parts.append(line)
        if r.message:
            parts.append(Text("          " + r.message, overflow="ellipsis", no_wrap=True, style="dim"))
    return Group(*parts)


def watch_targets(targets: Sequence[Target], *, console: Console, url: str | None = None,
                  refresh: float = 1.0) -> int:
    """Show live progress until every target finished: 0 if all are done, 1 if any failed or was
    cancelled, 130 on Ctrl-C (the tasks go on: watching never changes a task)."""
    from rich.live import Live
    from rich.text import Text

    from jobq_workers.watch import Watcher, summary

    with Watcher(targets, url=url) as watcher:
        live_started = False
        try:
            rows = watcher.rows()
            with Live(render(rows), console=console, auto_refresh=False) as live:
                live_started = True
                while not all(r.finished for r in rows):
                    watcher.wait(refresh)
                    rows = watcher.rows()
                    live.update(render(rows), refresh=True)
        except KeyboardInterrupt:
            if not live_started:  # Ctrl-C came before the first frame: show where things stand
                console.print(render(watcher.rows()))
            console.print("stopped watching; the tasks go on")
            return 130
    if not console.is_terminal:
        console.line()
    failures = [r for r in rows if r.status != "done"]
    for r in failures:
        console.print(Text(f"{r.key} {r.name}: {r.status}" + (f": {r.reason}" if r.reason else ""),
                           style=COLORS[r.status]), soft_wrap=True)
    console.print(Text(summary(rows)))
    return 1 if failures else 0


def watch(
    targets: Annotated[list[str], typer.Argument(help="doc:N, task:N, batch:N, or a document id.",
                                                 show_default=False)],
) -> None:
    """Show live progress bars until everything watched has finished (exit 1 if anything failed)."""
    from jobq_workers.watch import parse_target
    from jobqueue.cli.app import ensure_schema, out

    parsed = [parse_target(t) for t in targets]
    raise typer.Exit(watch_targets(parsed, console=out, url=ensure_schema()))


# ---------------------------------------------------------------- docs


# Narrowest the name column gets before optional columns give way; a name is what a user scans for.
_NAME_MIN = 20
# Dropped in this order when the terminal is too narrow for every column and a readable name.
_OPTIONAL = ("took", "batch", "pages")
_LEFT = ("name", "status")


def documents_table(rows: Sequence[DocumentRow], width: int) -> Table:
    """The `jobq docs` table, sized to ``width`` columns by hand.

    Left to itself rich shrinks the only wrappable column (the name) to nothing, or crops the right
    of the table, when the numbers do not leave room; so every column gets its natural width, the
    name takes what is left, and the least useful columns go (and the caption says so) when even
    that leaves no room for a readable name.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    cells = {
        "id": [str(d.doc_id) for d in rows],
        "name": [d.name for d in rows],
        "pages": [str(d.pages) for d in rows],
        "status": [d.status for d in rows],
        "progress": [f"{max(d.progress, 0):.0%}" for d in rows],
        "tasks": [f"{d.done}/{d.tasks}" for d in rows],
        "chunks": [str(d.chunks) for d in rows],
        "summaries": [str(d.summaries) for d in rows],
        "batch": [str(d.batch_id or "") for d in rows],
        "took": [f"{d.duration:.1f}s" if d.duration is not None else "" for d in rows],
    }
    natural = {col: max([len(col), *(len(v) for v in values)]) for col, values in cells.items()}
    shown = list(cells)

    def room() -> int:  # for the name: two characters between columns (padding and rule)
        return width - sum(natural[c] for c in shown if c != "name") - 2 * (len(shown) - 1)

    hidden = []
    for col in _OPTIONAL:
        if room() >= min(_NAME_MIN, natural["name"]):
            break
        shown.remove(col)
        hidden.append(col)
    table = Table(title=f"{len(rows)} document(s)", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True, caption=f"({', '.join(hidden)} hidden at this width)" if hidden else None)
    for col in shown:
        if col == "name":
            table.add_column(col, width=max(4, min(natural[col], room())), overflow="fold")
        else:
            table.add_column(col, width=natural[col], no_wrap=True, justify="left" if col in _LEFT else "right")
    for i, d in enumerate(rows):
        table.add_row(*(Text(cells[c][i], style=COLORS.get(d.status, "white")) if c == "status" else cells[c][i]
                        for c in shown))
    return table


def docs(
    batch: Annotated[int | None, typer.Option(help="Only this batch's documents.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner's documents.")] = None,
    status: Annotated[str | None, typer.Option(help="Only documents in this state.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 50,
) -> None:
    """List documents, most recently enqueued first, with their status, progress and chunk counts."""
    from jobq_workers.documents import list_documents
    from jobq_workers.watch import STATUSES
    from jobqueue.cli.app import ensure_schema, fail, out, settings

    if status is not None and status not in STATUSES:
        fail(f"unknown status {status!r} (one of: {', '.join(STATUSES)})")
    s = settings()
    rows = list_documents(batch=batch, owner=owner, status=status, limit=limit, url=ensure_schema(s), settings=s)
    out.print(documents_table(rows, out.width))
