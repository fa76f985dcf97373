"""Re-enqueueing a document keeps what it was not asked to redo (issue 13): the summaries of an unchanged
document, the previous runs' tasks as history (superseded, pruned like any finished task), and no
empty batch when every file is refused."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest
from support import REPO, BackgroundWorker, jobq_cli, wait_for

from jobq_workers.documents import enqueue_files
from jobqueue import Client, InvalidTransition

SAMPLES = REPO / "examples" / "samples"
HANDBOOK = str(SAMPLES / "handbook.pdf")
GUIDE = str(SAMPLES / "guide.md")


@pytest.fixture
def fresh(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("TRUNCATE tasks, documents, batches, chunks, workers RESTART IDENTITY CASCADE")
    return conn


def finish(conn: psycopg.Connection[Any], doc_id: int) -> None:
    with BackgroundWorker(["dataflow", "raptor"], concurrency=4, poll_seconds=0.2):
        wait_for(lambda: conn.execute("SELECT status IN ('done', 'failed', 'cancelled') FROM document_progress "
                                      "WHERE doc_id = %s", (doc_id,)).fetchone()[0], timeout=90)


def summaries(conn: psycopg.Connection[Any], doc_id: int) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM chunks WHERE doc_id = %s AND level > 0 ORDER BY id",
                                       (doc_id,)).fetchall()]


def done_last_hour(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT COALESCE(sum(done_last_hour), 0) FROM queue_depth").fetchone()[0])


def test_reenqueue_keeps_summaries_and_history(fresh: psycopg.Connection[Any]) -> None:
    first = enqueue_files([HANDBOOK], then="raptor").files[0]
    doc = first.doc_id
    assert doc is not None
    finish(fresh, doc)
    tree = summaries(fresh, doc)
    assert tree
    history_before = done_last_hour(fresh)
    assert history_before == 5

    # Unchanged and no --then raptor: the summaries are still valid and stay, carried by the new run.
    again = enqueue_files([HANDBOOK]).files[0]
    assert (again.reused, again.queued, again.summaries_removed) == (5, 0, 0)
    assert summaries(fresh, doc) == tree
    assert fresh.execute("SELECT status, tasks, done, summaries FROM document_progress WHERE doc_id = %s",
                         (doc,)).fetchone() == ("done", 5, 5, len(tree))
    # The first run is history: superseded, still counted by the dashboards' "done in the last hour".
    assert fresh.execute("SELECT count(*) FROM tasks WHERE doc_id = %s AND superseded_at IS NOT NULL",
                         (doc,)).fetchone()[0] == 5
    assert done_last_hour(fresh) == 10
    assert fresh.execute("SELECT count(*) FILTER (WHERE current), count(*) FILTER (WHERE NOT current) "
                         "FROM document_tasks WHERE doc_id = %s", (doc,)).fetchone() == (5, 5)

    # Ranges that run again would leave the summaries describing replaced chunks: refused, unchanged.
    refused = enqueue_files([HANDBOOK], page_size=5).files[0]
    assert refused.error is not None
    assert f"{len(tree)} RAPTOR summaries" in refused.error and "--force" in refused.error
    assert summaries(fresh, doc) == tree
    r = jobq_cli("enqueue", HANDBOOK, "--page-size", "5")
    assert r.returncode == 1 and "--then raptor" in r.stderr and "Traceback" not in r.stderr

    # --force says what it removes.
    r = jobq_cli("enqueue", HANDBOOK, "--page-size", "5", "--force")
    assert r.returncode == 0, r.stderr
    assert f"{len(tree)} RAPTOR summaries removed" in r.stdout
    assert summaries(fresh, doc) == []
    assert fresh.execute("SELECT tasks, queued, summaries FROM document_progress WHERE doc_id = %s",
                         (doc,)).fetchone() == (8, 8, 0)


def test_superseded_tasks_are_not_retried_and_are_pruned(fresh: psycopg.Connection[Any], db_url: str) -> None:
    first = enqueue_files([GUIDE]).files[0]
    doc = first.doc_id
    fresh.execute("UPDATE tasks SET status = 'failed', progress = -1, finished_at = now() - interval '30 days', "
                  "last_error = 'boom' WHERE doc_id = %s", (doc,))
    assert fresh.execute("SELECT status, error FROM document_progress WHERE doc_id = %s",
                         (doc,)).fetchone() == ("failed", "boom")
    second = enqueue_files([GUIDE]).files[0]
    assert (second.reused, second.queued) == (0, 1)
    # The document's state is its current run's: the old failure is history.
    assert fresh.execute("SELECT status, error, tasks FROM document_progress WHERE doc_id = %s",
                         (doc,)).fetchone() == ("queued", None, 1)
    # Retrying the document never revives the superseded run (its chunks would sit beside the new ones).
    with pytest.raises(InvalidTransition, match="no failed or cancelled task"):
        Client(db_url).retry(doc_id=doc)
    with pytest.raises(InvalidTransition, match=f"earlier run of document {doc}"):
        Client(db_url).retry(first.tasks[0])
    assert fresh.execute("SELECT status FROM tasks WHERE id = %s", (first.tasks[0],)).fetchone() == ("failed",)

    r = jobq_cli("prune", "--older-than", "7d")
    assert r.returncode == 0 and "deleted 1 " in r.stdout, r.stdout
    assert [r[0] for r in fresh.execute("SELECT id FROM tasks WHERE doc_id = %s", (doc,)).fetchall()] == second.tasks


def test_a_call_whose_every_file_is_refused_leaves_no_batch(fresh: psycopg.Connection[Any], tmp_path: Any) -> None:
    assert enqueue_files([GUIDE]).batch_id == 1
    # Refused before anything is written (no such file) and refused while storing (still processing).
    res = enqueue_files([str(tmp_path / "missing.pdf"), GUIDE])
    assert res.batch_id is None and len(res.errors) == 2
    r = jobq_cli("enqueue", GUIDE, str(tmp_path / "missing.pdf"))
    assert r.returncode == 1 and "batch" not in r.stdout and "still being processed" in r.stderr
    assert fresh.execute("SELECT count(*) FROM batches").fetchone()[0] == 1
    # A call with one good file keeps its batch and counts the refused ones.
    res = enqueue_files([HANDBOOK, str(tmp_path / "missing.pdf")])
    assert res.batch_id is not None
    assert fresh.execute("SELECT requested, rejected FROM batches ORDER BY id").fetchall() == [(1, 0), (2, 1)]


def test_users_see_one_based_inclusive_pages(fresh: psycopg.Connection[Any]) -> None:
    res = enqueue_files([HANDBOOK]).files[0]
    doc = res.doc_id
    assert doc is not None
    finish(fresh, doc)
    # Stored: tasks 0-based with the end excluded; shown: pages as printed.
    assert fresh.execute("SELECT first_page, last_page FROM document_tasks WHERE doc_id = %s ORDER BY first_page",
                         (doc,)).fetchall() == [(1, 12), (13, 24), (25, 36), (37, 37)]
    first = res.tasks[0]
    assert fresh.execute("SELECT from_page, to_page FROM tasks WHERE id = %s", (first,)).fetchone() == (0, 12)
    log = fresh.execute("SELECT progress_msg FROM tasks WHERE id = %s", (first,)).fetchone()[0]
    assert "Page(1~12): Extracting pages 1-12 of handbook.pdf." in log
    # Chunks: stored 0-based inclusive; the view adds one to both ends, within the task's pages.
    rows = fresh.execute("SELECT k.from_page, k.to_page, v.first_page, v.last_page FROM chunks k "
                         "JOIN document_chunks v ON v.chunk_id = k.id WHERE k.task_id = %s", (first,)).fetchall()
    assert rows and all((a, b) == (lo + 1, hi + 1) and 1 <= a <= b <= 12 for lo, hi, a, b in rows)
    assert max(r[3] for r in rows) == 12
    r = jobq_cli("status", str(first))
    assert r.returncode == 0 and re.search(r"pages\s+1-12", r.stdout), r.stdout
    assert "from_page" not in r.stdout
