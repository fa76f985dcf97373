"""The live watcher behind `jobq watch` and `jobq enqueue --wait`.

It reads the document_progress view (exact at every moment, computed from the tasks table) and
re-reads it when a worker's progress flush notifies `<schema>.progress` for a watched document or
task, and on a slow timer, which also catches completions (they do not notify). Watching never
changes a task: Ctrl-C only stops the watcher.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from jobqueue.db.connect import connect, resolve_url
from jobqueue.errors import DocumentError, TaskNotFound
from jobqueue.settings import get_settings
from jobqueue.states import TERMINAL, progress_channel

Kind = Literal["doc", "task", "batch"]
FINISHED = TERMINAL
COLORS = {"done": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "queued": "white",
          "waiting": "magenta"}
_TARGET = re.compile(r"^(?:(doc|document|task|batch):)?(\d+)$")


@dataclass(frozen=True)
class Target:
    kind: Kind
    id: int


def parse_target(text: str) -> Target:
    """`doc:12`, `task:5`, `batch:3`, or a bare number (a document)."""
    m = _TARGET.match(text.strip().lower())
    if m is None:
        raise DocumentError(f"cannot watch {text!r}: expected doc:N, task:N, batch:N or a document id")
    kind = {"document": "doc", None: "doc"}.get(m.group(1), m.group(1))
    return Target(kind, int(m.group(2)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Row:
    """One line of the display: a document or a single task."""

    key: str
    name: str
    status: str
    progress: float
    ahead: int | None
    chunks: int
    summaries: int
    message: str
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class _Source:
    """Resolves the targets once, then reads their current rows."""

    def __init__(self, conn: psycopg.Connection[Any], targets: Sequence[Target]) -> None:
        self.conn = conn
        s = self.s = get_settings().schema_name
        self.docs: list[int] = []
        self.tasks: list[int] = []
        for t in targets:
            if t.kind == "batch":
                ids = [r[0] for r in conn.execute(f"SELECT id FROM {s}.documents WHERE batch_id = %s ORDER BY id",
                                                  (t.id,)).fetchall()]
                if not ids and conn.execute(f"SELECT 1 FROM {s}.batches WHERE id = %s", (t.id,)).fetchone() is None:
                    raise DocumentError(f"no batch {t.id}")
                self.docs.extend(ids)
            elif t.kind == "doc":
                if conn.execute(f"SELECT 1 FROM {s}.documents WHERE id = %s", (t.id,)).fetchone() is None:
                    raise DocumentError(f"no document {t.id}")
                self.docs.append(t.id)
            else:
                if conn.execute(f"SELECT 1 FROM {s}.tasks WHERE id = %s", (t.id,)).fetchone() is None:
                    raise TaskNotFound(f"no task with id {t.id}")
                self.tasks.append(t.id)
        self.docs = list(dict.fromkeys(self.docs))
        self.tasks = list(dict.fromkeys(self.tasks))

    def relevant(self, payload: str) -> bool:
        """A progress NOTIFY is `task_id,doc_id,progress`."""
        task_id, _, rest = payload.partition(",")
        doc_id = rest.partition(",")[0]
        return (task_id.isdigit() and int(task_id) in self.tasks) or (doc_id.isdigit() and int(doc_id) in self.docs)

    def rows(self) -> list[Row]:
        s = self.s
        out: list[Row] = []
        with self.conn.cursor(row_factory=dict_row) as cur:
            if self.docs:
                cur.execute(f"""SELECT doc_id, name, status, progress, queue_position, chunks, summaries,
                                       last_message, error
                                FROM {s}.document_progress WHERE doc_id = ANY(%s) ORDER BY doc_id""", (self.docs,))
                out += [Row(f"doc:{r['doc_id']}", r["name"], r["status"], r["progress"], r["queue_position"],
                            r["chunks"], r["summaries"], r["last_message"] or "", r["error"]) for r in cur.fetchall()]
            if self.tasks:
                cur.execute(f"""SELECT t.id, t.type, t.status, t.progress, {s}.queue_position(t.id) AS ahead,
                                       t.last_error, (SELECT count(*) FROM {s}.chunks k WHERE k.task_id = t.id) AS n,
                                       regexp_replace(t.progress_msg, '^.*\\n', '') AS last
                                FROM {s}.tasks t WHERE t.id = ANY(%s) ORDER BY t.id""", (self.tasks,))
                out += [Row(f"task:{r['id']}", r["type"], r["status"], r["progress"], r["ahead"], r["n"], 0,
                            r["last"], r["last_error"]) for r in cur.fetchall()]
        return out


def _status(r: Row) -> Text:
    label = r.status
    if r.status == "queued" and r.ahead is not None:
        label = f"queued, {r.ahead} task(s) ahead" if r.ahead else "queued, next"
    return Text(label, style=COLORS.get(r.status, "white"))


def render(rows: Sequence[Row]) -> Group:
    """Two lines per target: the bar and state, then the newest progress message (cut to one line).

    Fixed column widths keep the bars aligned although every target is its own grid."""
    parts: list[Table | Text] = []
    for r in rows:
        frac = max(r.progress, 0.0)
        line = Table.grid(padding=(0, 1))
        for width in (8, 18, 16, 4):
            line.add_column(width=width, no_wrap=True)
        line.add_column(min_width=9, no_wrap=True)
        line.add_column(no_wrap=True, overflow="ellipsis")
        chunks = f"{r.chunks} chunks" + (f" +{r.summaries} sum." if r.summaries else "")
        line.add_row(r.key, Text(r.name, overflow="ellipsis"), ProgressBar(total=1.0, completed=frac, width=16),
                     f"{frac:4.0%}", _status(r), chunks)
        parts.append(line)
        if r.message:
            parts.append(Text("          " + r.message, overflow="ellipsis", no_wrap=True, style="dim"))
    return Group(*parts)


def _wait(conn: psycopg.Connection[Any], source: _Source, timeout: float) -> None:
    """Return after a relevant NOTIFY (plus a short pause to coalesce a burst) or after `timeout`.

    Each notifies() generator is run to its end before the next starts: a suspended one holds the
    connection's lock."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        batch = list(conn.notifies(timeout=left, stop_after=1))
        if any(source.relevant(n.payload) for n in batch):
            list(conn.notifies(timeout=0.1))
            return


def _summary(rows: Sequence[Row]) -> Text:
    counts = {st: sum(1 for r in rows if r.status == st) for st in FINISHED}
    what = ", ".join(f"{n} {st}" for st, n in counts.items() if n) or "nothing finished"
    return Text(f"{len(rows)} watched: {what}")


def watch(targets: Sequence[Target], *, console: Console, url: str | None = None, refresh: float = 1.0) -> int:
    """Show live progress until every target finished: 0 if all are done, 1 if any failed or was
    cancelled, 130 on Ctrl-C (the tasks go on)."""
    if not targets:
        raise DocumentError("nothing to watch")
    with connect(url or resolve_url(), autocommit=True) as conn:
        source = _Source(conn, targets)
        if not source.docs and not source.tasks:
            raise DocumentError("nothing to watch: the batch has no documents")
        live_started = False
        try:
            conn.execute(f'LISTEN "{progress_channel(source.s)}"')
            rows = source.rows()
            with Live(render(rows), console=console, auto_refresh=False) as live:
                live_started = True
                while not all(r.finished for r in rows):
                    _wait(conn, source, refresh)
                    rows = source.rows()
                    live.update(render(rows), refresh=True)
        except KeyboardInterrupt:
            if not live_started:  # Ctrl-C came before the first frame: show where things stand
                console.print(render(source.rows()))
            console.print("stopped watching; the tasks go on")
            return 130
    if not console.is_terminal:
        console.line()
    failures = [r for r in rows if r.status != "done"]
    for r in failures:
        reason = (r.error or r.message or "").strip().splitlines()
        console.print(Text(f"{r.key} {r.name}: {r.status}" + (f": {reason[-1][:300]}" if reason else ""),
                           style=COLORS[r.status]), soft_wrap=True)
    console.print(_summary(rows))
    return 1 if failures else 0


__all__ = ["Row", "Target", "parse_target", "render", "watch"]
