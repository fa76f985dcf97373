"""The dataflow worker against the real database: chunks, progress, atomicity, cancellation, retries."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import REPO, BackgroundWorker, wait_for

from jobq_workers.documents import enqueue_files
from jobqueue import Client
from jobqueue.settings import get_settings

SAMPLES = REPO / "examples" / "samples"
HANDBOOK = str(SAMPLES / "handbook.pdf")
INVENTORY = str(SAMPLES / "inventory.csv")


@pytest.fixture
def fresh(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("TRUNCATE tasks, documents, batches, chunks, workers "
                 "RESTART IDENTITY CASCADE")
    return conn


def status_of(conn: psycopg.Connection[Any], doc: int | None) -> str:
    return str(conn.execute("SELECT status FROM document_progress WHERE doc_id = %s", (doc,)).fetchone()[0])


def finished(conn: psycopg.Connection[Any], doc: int | None) -> bool:
    return status_of(conn, doc) in ("done", "failed", "cancelled")


@contextlib.contextmanager
def chunks_locked(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """Holds a lock that makes every chunk INSERT wait: a worker is caught mid-transaction."""
    with psycopg.connect(db_url) as c:
        c.execute("LOCK TABLE chunks IN SHARE MODE")
        yield c


def blocked_insert(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND query LIKE 'INSERT INTO %chunks%'").fetchone()[0])


def test_chunks_cover_the_range_with_staged_progress(fresh: psycopg.Connection[Any]) -> None:
    res = enqueue_files([HANDBOOK, INVENTORY])
    pdf, csv = (f.doc_id for f in res.files)
    with BackgroundWorker(["dataflow"], concurrency=4, poll_seconds=0.2):
        wait_for(lambda: finished(fresh, pdf) and finished(fresh, csv), timeout=60)
    assert status_of(fresh, pdf) == status_of(fresh, csv) == "done"
    logs = []
    for task_id, lo, hi, result, log in fresh.execute(
            "SELECT id, from_page, to_page, result, progress_msg FROM tasks WHERE doc_id = %s ORDER BY id",
            (pdf,)).fetchall():
        rows = fresh.execute("SELECT id, from_page, to_page, token_count, level FROM chunks WHERE task_id = %s "
                             "ORDER BY position", (task_id,)).fetchall()
        assert rows and all(lo <= r[1] <= r[2] < hi and r[3] > 0 and r[4] == 0 for r in rows)
        assert result["chunk_ids"] == sorted(r[0] for r in rows) and result["chunks"] == len(rows)
        assert result["tokens"] == sum(r[3] for r in rows)
        assert f"Page({lo + 1}~{hi}): Done." in log
        logs.append(log)
    # A progress flush racing the completion can drop its lines (reported to the core), so each stage
    # is looked for in the log of any of the document's tasks.
    for stage in ("Task has been received", "Extracted", "Chunked into", "Stored"):
        assert any(stage in log for log in logs), logs
    pages = {p for (lo, hi) in fresh.execute("SELECT from_page, to_page FROM chunks WHERE doc_id = %s",
                                             (pdf,)).fetchall() for p in range(lo, hi + 1)}
    assert pages == set(range(37))
    view = fresh.execute("SELECT chunks, tokens, progress, duration > 0 FROM document_progress WHERE doc_id = %s",
                         (csv,)).fetchone()
    assert view[0] > 100 and view[1] > 10_000 and view[2] == 1.0 and view[3]


@pytest.mark.timeout(90)
def test_killed_worker_leaves_no_chunks_and_the_rescued_task_completes_once(
        fresh: psycopg.Connection[Any], db_url: str) -> None:
    doc = enqueue_files([HANDBOOK], pages="1-3").files[0]
    env = {**os.environ, "JOBQ_DATABASE_URL": db_url, "JOBQ_LEASE_SECONDS": "2", "JOBQ_HEARTBEAT_SECONDS": "0.5"}
    with chunks_locked(db_url) as lock:
        proc = subprocess.Popen([sys.executable, "-m", "jobqueue", "worker", "--types", "dataflow"], env=env,
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: blocked_insert(fresh), timeout=30)  # chunks extracted, insert under way
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        lock.rollback()  # the dead worker's backend runs its insert, finds its client gone, rolls back
    wait_for(lambda: not blocked_insert(fresh))
    assert fresh.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    assert fresh.execute("SELECT status, attempt FROM tasks").fetchone() == ("running", 1)

    settings = get_settings().model_copy(update={"lease_seconds": 2.0, "heartbeat_seconds": 0.5})
    with BackgroundWorker(["dataflow"], settings=settings, poll_seconds=0.2):
        wait_for(lambda: finished(fresh, doc.doc_id), timeout=30)
    task = fresh.execute("SELECT id, status, attempt, retry_count, result, progress_msg FROM tasks").fetchone()
    assert task[1:4] == ("done", 2, 1) and "lost; task rescued" in task[5]
    rows = fresh.execute("SELECT id, task_id, position FROM chunks ORDER BY id").fetchall()
    assert rows and {r[1] for r in rows} == {task[0]}
    assert len({r[2] for r in rows}) == len(rows) == task[4]["chunks"]  # written exactly once


@pytest.mark.timeout(60)
def test_cancel_mid_task_rolls_back_its_chunks(fresh: psycopg.Connection[Any], client: Client, db_url: str) -> None:
    doc = enqueue_files([HANDBOOK], pages="1-2").files[0].doc_id
    with chunks_locked(db_url) as lock, BackgroundWorker(["dataflow"], poll_seconds=0.2):
        wait_for(lambda: blocked_insert(fresh), timeout=30)
        assert client.cancel(doc_id=doc) == {1: "running"}
        wait_for(lambda: finished(fresh, doc), timeout=20)
        lock.rollback()
    assert status_of(fresh, doc) == "cancelled"
    assert fresh.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    assert "[Canceled]" in fresh.execute("SELECT progress_msg FROM tasks").fetchone()[0]


def test_a_transient_error_is_retried_not_final(fresh: psycopg.Connection[Any], tmp_path: Path) -> None:
    shared = tmp_path / "handbook.pdf"
    shutil.copy(HANDBOOK, shared)
    doc = enqueue_files([str(shared)], by_reference=True, pages="1-2").files[0].doc_id
    assert fresh.execute("SELECT content IS NULL, uri FROM documents").fetchone() == (True, str(shared))
    hidden = shared.rename(tmp_path / "away.pdf")  # shared storage briefly unavailable
    settings = get_settings().model_copy(update={"backoff_base": 0.3, "backoff_max": 0.5})
    with BackgroundWorker(["dataflow"], settings=settings, poll_seconds=0.1):
        wait_for(lambda: fresh.execute("SELECT retry_count FROM tasks").fetchone()[0] >= 1, timeout=20)
        assert status_of(fresh, doc) == "running"  # not failed for good
        hidden.rename(shared)
        wait_for(lambda: finished(fresh, doc), timeout=20)
    assert status_of(fresh, doc) == "done"
    assert fresh.execute("SELECT count(*) FROM chunks").fetchone()[0] > 0


def test_a_referenced_file_that_changed_fails_for_good(fresh: psycopg.Connection[Any], tmp_path: Path) -> None:
    shared = tmp_path / "handbook.pdf"
    shutil.copy(HANDBOOK, shared)
    doc = enqueue_files([str(shared)], by_reference=True, pages="1").files[0].doc_id
    shared.write_bytes(shared.read_bytes() + b"\n% appended")
    with BackgroundWorker(["dataflow"], poll_seconds=0.1):
        wait_for(lambda: finished(fresh, doc), timeout=20)
    row = fresh.execute("SELECT status, retry_count, last_error FROM tasks").fetchone()
    assert row[0] == "failed" and row[1] == 1 and "changed since it was enqueued" in row[2]
    assert status_of(fresh, doc) == "failed"
