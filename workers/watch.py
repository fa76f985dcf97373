"""What `jobq watch` and `jobq enqueue --wait` show: the watched targets' rows, and when to re-read them.

It reads the document_progress view (exact at every moment, computed from the tasks table) and
re-reads it when a worker's progress flush notifies `<schema>.progress` for a watched document or
task, and on a slow timer, which also catches completions (they do not notify). Watching never
changes a task. This module holds the data only; the CLI (jobqueue/cli/documents.py) draws it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import psycopg

from jobqueue import LIVE, TERMINAL, DocumentError, TaskNotFound, connect

from .queries import DocumentSQL, fetch_dicts, sql

Kind = Literal["doc", "task", "batch"]
FINISHED = TERMINAL
STATUSES = (*LIVE, *TERMINAL)
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

    @property
    def reason(self) -> str | None:
        """The last line of the error (or of the progress message) of a target that did not end done."""
        lines = (self.error or self.message or "").strip().splitlines()
        return lines[-1][:300] if lines else None


def summary(rows: Sequence[Row]) -> str:
    """`3 watched: 2 done, 1 failed`."""
    counts = {st: sum(1 for r in rows if r.status == st) for st in FINISHED}
    what = ", ".join(f"{n} {st}" for st, n in counts.items() if n) or "nothing finished"
    return f"{len(rows)} watched: {what}"


class Watcher:
    """The watched targets on one listening connection: resolved once, then read as often as needed.

    ``with Watcher(targets) as w: rows = w.rows(); w.wait(1.0)``. Opening it raises a
    :class:`DocumentError` (or :class:`TaskNotFound`) for a target that does not exist.
    """

    def __init__(self, targets: Sequence[Target], *, url: str | None = None) -> None:
        if not targets:
            raise DocumentError("nothing to watch")
        self.targets = list(targets)
        self.url = url
        self.q: DocumentSQL = sql()
        self.docs: list[int] = []
        self.tasks: list[int] = []
        self._conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> Watcher:
        self._conn = connect(self.url, autocommit=True)
        try:
            self._resolve()
            self._fetch(self.q.listen_progress)
        except BaseException:
            self._conn.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._conn is not None:
            self._conn.close()

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("use the Watcher as a context manager")
        return self._conn

    def _fetch(self, statement: str, *params: Any) -> list[dict[str, Any]]:
        return fetch_dicts(self.conn, statement, *params)

    def _exists(self, statement: str, id: int) -> bool:
        return bool(self._fetch(statement, id)[0]["exists"])

    def _resolve(self) -> None:
        q = self.q
        for t in self.targets:
            if t.kind == "batch":
                ids = [r["id"] for r in self._fetch(q.batch_documents, t.id)]
                if not ids and not self._exists(q.batch_exists, t.id):
                    raise DocumentError(f"no batch {t.id}")
                self.docs.extend(ids)
            elif t.kind == "doc":
                if not self._exists(q.document_exists, t.id):
                    raise DocumentError(f"no document {t.id}")
                self.docs.append(t.id)
            else:
                if not self._exists(q.task_exists, t.id):
                    raise TaskNotFound(f"no task with id {t.id}")
                self.tasks.append(t.id)
        self.docs = list(dict.fromkeys(self.docs))
        self.tasks = list(dict.fromkeys(self.tasks))
        if not self.docs and not self.tasks:
            raise DocumentError("nothing to watch: the batch has no documents")

    def relevant(self, payload: str) -> bool:
        """A progress NOTIFY is `task_id,doc_id,progress`."""
        task_id, _, rest = payload.partition(",")
        doc_id = rest.partition(",")[0]
        return (task_id.isdigit() and int(task_id) in self.tasks) or (doc_id.isdigit() and int(doc_id) in self.docs)

    def rows(self) -> list[Row]:
        """The current state of every target, documents first."""
        out: list[Row] = []
        if self.docs:
            out += [Row(f"doc:{r['doc_id']}", r["name"], r["status"], r["progress"], r["queue_position"],
                        r["chunks"], r["summaries"], r["last_message"] or "", r["error"])
                    for r in self._fetch(self.q.document_rows, self.docs)]
        if self.tasks:
            out += [Row(f"task:{r['id']}", r["type"], r["status"], r["progress"], r["ahead"], r["chunks"], 0,
                        r["last_message"], r["last_error"])
                    for r in self._fetch(self.q.task_rows, self.tasks)]
        return out

    def wait(self, timeout: float) -> None:
        """Return after a relevant NOTIFY (plus a short pause to coalesce a burst) or after `timeout`.

        Each notifies() generator is run to its end before the next starts: a suspended one holds the
        connection's lock."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            batch = list(self.conn.notifies(timeout=left, stop_after=1))
            if any(self.relevant(n.payload) for n in batch):
                list(self.conn.notifies(timeout=0.1))
                return


__all__ = ["FINISHED", "STATUSES", "Row", "Target", "Watcher", "parse_target", "summary"]
