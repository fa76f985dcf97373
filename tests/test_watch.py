"""`jobq watch` and `jobq enqueue --wait`: targets, exit codes, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import REPO, BackgroundWorker, jobq_cli, wait_for

from jobq_workers.documents import enqueue_files
from jobq_workers.watch import Target, parse_target
from jobqueue import Context, Fail, registry
from jobqueue.errors import DocumentError


def note(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"{text[:12].replace(' ', '_')}.md"
    path.write_text(f"# {text}\n\nA short note about {text}, written for one test only.\n")
    return str(path)


def test_target_forms() -> None:
    assert parse_target("doc:12") == Target("doc", 12) == parse_target("12") == parse_target("document:12")
    assert parse_target("task:5") == Target("task", 5)
    assert parse_target("BATCH:3") == Target("batch", 3)
    for bad in ("doc:", "x:1", "-1", "task:five"):
        with pytest.raises(DocumentError, match="cannot watch"):
            parse_target(bad)


def test_unknown_targets_are_one_line_errors(db_url: str) -> None:
    for target, message in (("doc:999", "no document 999"), ("task:999", "no task with id 999"),
                            ("batch:999", "no batch 999"), ("nope", "cannot watch")):
        r = jobq_cli("watch", target)
        assert r.returncode == 1 and r.stderr.strip().startswith("error:") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_wait_exits_0_when_every_document_is_done(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    files = [note(tmp_path, "alpha waits"), note(tmp_path, "beta waits")]
    with BackgroundWorker(["dataflow", "raptor"], poll_seconds=0.1):
        r = jobq_cli("enqueue", *files, "--then", "raptor", "--wait", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 watched: 2 done" in r.stdout
    batch = conn.execute("SELECT max(id) FROM batches").fetchone()[0]
    assert conn.execute("SELECT files, succeeded FROM batch_progress WHERE batch_id = %s",
                        (batch,)).fetchone() == (2, 2)
    again = jobq_cli("watch", f"batch:{batch}", "task:1")
    assert again.returncode == 0 and "3 watched: 3 done" in again.stdout, again.stdout


def test_wait_exits_1_when_a_document_fails(conn: psycopg.Connection[Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: Context, payload: Any) -> None:
        raise Fail("the extraction service is broken")

    real = registry.get_type("dataflow")
    monkeypatch.setitem(registry._registry, "dataflow", registry.TaskType("dataflow", broken, real.payload))
    with BackgroundWorker(["dataflow"], poll_seconds=0.1):
        r = jobq_cli("enqueue", note(tmp_path, "gamma fails"), "--wait", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed" in r.stdout and "the extraction service is broken" in r.stdout
    doc = conn.execute("SELECT max(id) FROM documents").fetchone()[0]
    r = jobq_cli("watch", str(doc))
    assert r.returncode == 1 and "1 watched: 1 failed" in r.stdout


def test_ctrl_c_stops_watching_and_leaves_the_tasks_alone(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    ahead = enqueue_files([note(tmp_path, "delta ahead")]).files[0]
    doc = enqueue_files([note(tmp_path, "epsilon waits")]).files[0].doc_id
    proc = subprocess.Popen([sys.executable, "-m", "jobqueue", "watch", f"doc:{doc}"], cwd=REPO, env=os.environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: conn.execute(  # it listens, then reads the view
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND query LIKE '%document_progress%'").fetchone()[0] > 0, timeout=20)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, out + err
    assert "queued, 1 task(s) ahead" in out and "stopped watching" in out
    rows = conn.execute("SELECT status, cancel_requested_at FROM tasks WHERE doc_id = ANY(%s)",
                        ([doc, ahead.doc_id],)).fetchall()
    assert rows == [("queued", None)] * 2
