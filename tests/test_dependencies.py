"""Dependencies: a dependent is released exactly once, and a failed parent cancels it."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import REPO, BackgroundWorker, wait_for

from jobq_workers.documents import enqueue_files
from jobqueue import Client, Context, task
from jobqueue.registry import unregister

HANDBOOK = str(REPO / "examples" / "samples" / "handbook.pdf")
runs: Counter[int] = Counter()
lock = threading.Lock()


@pytest.fixture(scope="module", autouse=True)
def dep_types() -> Any:
    def record(ctx: Context, payload: Any) -> None:
        with lock:
            runs[ctx.id] += 1

    task("dep_parent")(record)
    task("dep_child")(record)
    yield
    unregister("dep_parent")
    unregister("dep_child")


def test_release_happens_exactly_once_under_two_workers(conn: psycopg.Connection[Any], client: Client) -> None:
    runs.clear()
    children = []
    for _ in range(10):
        parents = client.enqueue_many("dep_parent", [{} for _ in range(8)])
        children.append(client.enqueue("dep_child", {}, depends_on=parents))
    with BackgroundWorker(["dep_parent", "dep_child"], concurrency=8, poll_seconds=0.1), \
            BackgroundWorker(["dep_parent", "dep_child"], concurrency=8, poll_seconds=0.1):
        wait_for(lambda: conn.execute("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'done'",
                                      (children,)).fetchone()[0] == len(children), timeout=30)
    assert all(runs[c] == 1 for c in children)
    rows = conn.execute("SELECT attempt, pending_deps, status FROM tasks WHERE id = ANY(%s)",
                        (children,)).fetchall()
    assert rows == [(1, 0, "done")] * len(children)
    assert all(n == 1 for n in runs.values()) and len(runs) == 90


def test_document_raptor_runs_once_under_two_workers(conn: psycopg.Connection[Any]) -> None:
    res = enqueue_files([HANDBOOK], then="raptor", pages="1-24", page_size=3).files[0]
    with BackgroundWorker(["dataflow", "raptor"], concurrency=4, poll_seconds=0.1), \
            BackgroundWorker(["dataflow", "raptor"], concurrency=4, poll_seconds=0.1):
        wait_for(lambda: conn.execute("SELECT status FROM tasks WHERE id = %s",
                                      (res.then_task,)).fetchone()[0] == "done", timeout=60)
    attempt, result = conn.execute("SELECT attempt, result FROM tasks WHERE id = %s",
                                   (res.then_task,)).fetchone()
    summaries = conn.execute("SELECT count(*) FROM chunks WHERE doc_id = %s AND level > 0",
                             (res.doc_id,)).fetchone()[0]
    assert attempt == 1 and summaries == result["summaries"] > 0


def test_a_failed_parent_cancels_the_dependent(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    shared = tmp_path / "handbook.pdf"
    shutil.copy(HANDBOOK, shared)
    res = enqueue_files([str(shared)], then="raptor", by_reference=True, pages="1-14").files[0]
    shared.write_bytes(b"%PDF-1.4 replaced")  # the parents will fail for good (content changed)
    with BackgroundWorker(["dataflow", "raptor"], poll_seconds=0.1):
        wait_for(lambda: conn.execute("SELECT status FROM document_progress WHERE doc_id = %s",
                                      (res.doc_id,)).fetchone()[0] in ("failed", "cancelled", "done"), timeout=30)
    child = conn.execute("SELECT status, attempt, progress_msg FROM tasks WHERE id = %s",
                         (res.then_task,)).fetchone()
    assert child[0] == "cancelled" and child[1] == 0 and "[Canceled] parent task" in child[2]
    assert conn.execute("SELECT status FROM document_progress WHERE doc_id = %s",
                        (res.doc_id,)).fetchone()[0] == "failed"
    assert conn.execute("SELECT count(*) FROM chunks WHERE doc_id = %s", (res.doc_id,)).fetchone()[0] == 0
