"""The CLI's commands and every error path a user can cause: one line, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import REPO, SCHEMA, create_database, drop_database, jobq_cli

from jobqueue.errors import DatabaseUnavailable


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


def test_enqueue_a_type_without_its_handler(db_url: str, conn: psycopg.Connection[Any], clean: None) -> None:
    """--type accepts an unregistered type; --import (or JOBQ_IMPORTS) brings a declared model to validate."""
    r = jobq_cli("enqueue", "--type", "transcode", "--payload", '{"file": "a.mp4"}')
    assert r.returncode == 0, r.stderr
    assert conn.execute("SELECT type FROM tasks WHERE id = %s", (int(r.stdout),)).fetchone() == ("transcode",)
    r = jobq_cli("enqueue", "--type", "thumbnail", "--payload", '{"url": "s3://b/c.png"}',
                 "--import", "examples.producer")
    assert r.returncode == 0, r.stderr
    row = conn.execute("SELECT payload, priority FROM tasks WHERE id = %s", (int(r.stdout),)).fetchone()
    assert row == ({"url": "s3://b/c.png", "width": 256}, 5)
    line = one_line_error(jobq_cli("enqueue", "--type", "thumbnail", "--payload", '{"width": 1}',
                                   env={"JOBQ_IMPORTS": "examples.producer"}))
    assert "url" in line and tasks_count(conn) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("enqueue", "--type", "no such type", "--payload", "{}"), "1-48 characters"),
        (("enqueue", "--type", "t", "--import", "no_such_module"), "cannot import"),
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
    url = create_database(server_url)
    try:
        line = one_line_error(jobq_cli("ls", env={"JOBQ_DATABASE_URL": url}))
        assert "jobq migrate" in line
    finally:
        drop_database(server_url, url)


def test_head_revision_found_without_alembic_is_alembics_head() -> None:
    from alembic.script import ScriptDirectory

    from jobqueue.admin.migrate import alembic_config
    from jobqueue.admin.revision import head_revision, revisions

    script = ScriptDirectory.from_config(alembic_config("postgresql://unused@localhost/x", SCHEMA))
    assert head_revision() == script.get_current_head()
    assert set(revisions()) == {r.revision for r in script.walk_revisions()}


@pytest.mark.parametrize(("source", "declared"), [
    ('revision = "0012"\ndown_revision = "0011"\n', ("0012", ("0011",))),
    ('revision: str = "a1"\ndown_revision: str | None = None\n', ("a1", ())),
    ('"""revision = \'in a docstring\' is not\nat the top level"""\nrevision = "m"\ndown_revision = ("a",\n    "b")\n',
     ("m", ("a", "b"))),
    ("import os\n", None),
], ids=["plain", "annotated", "merge-over-lines", "not-a-migration"])
def test_a_migration_files_revision_is_read_without_importing_it(tmp_path: Path, source: str,
                                                                 declared: Any) -> None:
    from jobqueue.admin.revision import _declared

    path = tmp_path / "m.py"
    path.write_text(source, encoding="utf-8")
    assert _declared(path) == declared


@pytest.mark.parametrize(("version", "needle"), [("0001", "older revision"), ("9999_future", "newer jobq")])
def test_schema_not_at_this_jobqs_revision(db_url: str, conn: psycopg.Connection[Any], version: str,
                                           needle: str) -> None:
    from jobqueue.admin.revision import head_revision

    conn.execute("UPDATE alembic_version SET version_num = %s", (version,))
    try:
        line = one_line_error(jobq_cli("ls"))
        assert needle in line and SCHEMA in line
    finally:
        conn.execute("UPDATE alembic_version SET version_num = %s", (head_revision(),))
    assert jobq_cli("ls").returncode == 0


READ_ONLY_IMPORTS = """
import sys
from jobqueue.cli import main
unused_driver = sys.argv.pop(1)
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = sorted(m for m in ("alembic", "sqlalchemy", unused_driver, "jobq_workers", "jobqueue.runtime.worker",
                           "prometheus_client") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize(("args", "unused_driver"), [(("ls",), "psycopg"), (("status", "{id}"), "asyncpg"),
                                                     (("stats", "--json"), "asyncpg")], ids=["ls", "status", "stats"])
def test_read_only_commands_import_no_migration_tool_or_runtime(db_url: str, conn: psycopg.Connection[Any],
                                                               args: tuple[str, ...], unused_driver: str) -> None:
    """What makes `jobq ls` start fast (measured by `python -m bench startup`, not timed here): one
    driver only (asyncpg for ls, whose import takes half of psycopg's), no migration tool, no runtime."""
    row = conn.execute("INSERT INTO tasks (type) VALUES ('dataflow') RETURNING id").fetchone()
    assert row is not None
    argv = [a.format(id=row[0]) for a in args]
    r = subprocess.run([sys.executable, "-c", READ_ONLY_IMPORTS, unused_driver, *argv], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout


LS_IMPORTS = """
import sys
from jobqueue.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("LOADED", sorted(m for m in ("pydantic", "pydantic_settings", "jobqueue.settings", "jobqueue.models",
                                   "jobqueue.client.sync", "psycopg") if m in sys.modules))
"""


@pytest.mark.parametrize("how", ["environment", "option"])
def test_ls_reads_plain_rows_without_pydantic_or_a_client(db_url: str, conn: psycopg.Connection[Any],
                                                         how: str) -> None:
    """`jobq ls` with a URL builds no settings and no client: pydantic was a third of its start-up. It
    reads on asyncpg, never importing psycopg (twice asyncpg's import time). It still says why a listed
    queued task will not move."""
    conn.execute("INSERT INTO tasks (type) VALUES ('ls_nobody_serves')")
    env = dict(os.environ)
    args = ["ls", "--type", "ls_nobody_serves"]
    if how == "option":
        url = env.pop("JOBQ_DATABASE_URL")
        args = ["--database-url", url, *args]
    r = subprocess.run([sys.executable, "-c", LS_IMPORTS, *args], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout
    assert "ls_nobody_serves: no live worker serves it" in " ".join(r.stdout.split())


def test_a_connection_broken_under_a_read_is_one_error(db_url: str, conn: psycopg.Connection[Any]) -> None:
    """The read-only commands' connection killed under a read ends in one DatabaseUnavailable: leaving
    the block with the broken connection raises nothing more (a traceback for the user otherwise)."""
    from jobqueue.db.reader import reading

    with pytest.raises(DatabaseUnavailable), reading(db_url) as r:
        pid = r.run(r.conn.fetchval("SELECT pg_backend_pid()"))
        conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        r.fetch("SELECT 1")
    assert r.conn.is_closed()


def test_database_url_option_is_used_and_not_written_to_the_environment(db_url: str) -> None:
    """--database-url reaches the command as a setting; os.environ is left as it was."""
    probe = """
import os, sys
from jobqueue.cli import main
os.environ.pop("JOBQ_DATABASE_URL", None)
try:
    main(["--database-url", sys.argv[1], "ls"])
except SystemExit as exc:
    print("EXIT", exc.code)
print("ENV", os.environ.get("JOBQ_DATABASE_URL"))
"""
    r = subprocess.run([sys.executable, "-c", probe, db_url], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "EXIT 0" in r.stdout and "ENV None" in r.stdout, (r.stdout, r.stderr)
    bad = "postgresql://bob:s3cret@127.0.0.1:1/elsewhere"
    line = one_line_error(jobq_cli("--database-url", bad, "ls"))
    assert "127.0.0.1:1/elsewhere" in line and "s3cret" not in line
