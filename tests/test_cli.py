"""The CLI's commands and every error path a user can cause: one line, non-zero exit, no traceback."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from support import jobq_cli


def one_line_error(r: Any) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:"), r.stderr
    return lines[0]


def tasks_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM tasks").fetchone()
    assert row is not None
    return int(row[0])


def test_enqueue_status_ls_cancel_retry(db_url: str, conn: psycopg.Connection[Any], clean: None) -> None:
    r = jobq_cli("enqueue", "--type", "dataflow", "--payload", json.dumps({"doc_id": 1, "from_page": 0,
                 "to_page": 1}), "--priority", "3")
    assert r.returncode == 0, r.stderr
    tid = int(r.stdout.strip())
    r = jobq_cli("status", str(tid), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["priority"] == 3
    r = jobq_cli("ls", "--status", "queued")
    assert r.returncode == 0 and str(tid) in r.stdout
    r = jobq_cli("cancel", str(tid))
    assert r.returncode == 0 and "cancelled" in r.stdout
    r = jobq_cli("retry", str(tid))
    assert r.returncode == 0 and "queued" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("enqueue", "--type", "no_such_type", "--payload", "{}"), "unknown task type"),
        (("enqueue", "--type", "dataflow", "--payload", "{not json"), "not valid JSON"),
        (("status", "999999999"), "no task with id"),
        (("cancel", "999999999"), "no task with id"),
        (("retry", "999999999"), "no task with id"),
        (("ls", "--status", "bogus"), "unknown status"),
        (("worker", "--types", "no_such_type", "--burst"), "unknown task type"),
        (("enqueue",), "nothing to enqueue"),
    ],
)
def test_user_errors_are_one_line(db_url: str, conn: psycopg.Connection[Any], args: tuple[str, ...],
                                  needle: str) -> None:
    before = tasks_count(conn)
    line = one_line_error(jobq_cli(*args))
    assert needle in line
    assert tasks_count(conn) == before


def test_unreachable_database_hides_password() -> None:
    url = "postgresql://bob:s3cret@127.0.0.1:1/nowhere"
    line = one_line_error(jobq_cli("ls", env={"JOBQ_DATABASE_URL": url}))
    assert "cannot connect" in line and "s3cret" not in line and "***" in line


def test_bad_url() -> None:
    line = one_line_error(jobq_cli("ls", env={"JOBQ_DATABASE_URL": "mysql://x@y/z"}))
    assert "not a PostgreSQL URL" in line


def test_schema_missing_on_real_server(server_url: str) -> None:
    from conftest import create_database, drop_database

    url = create_database(server_url)
    try:
        line = one_line_error(jobq_cli("ls", env={"JOBQ_DATABASE_URL": url}))
        assert "jobq migrate" in line
    finally:
        drop_database(server_url, url)
