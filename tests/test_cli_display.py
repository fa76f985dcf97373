"""What the CLI shows at a common terminal size (80x24, or piped), and the commands it prints for others.

Issue 13: `jobq docs` collapsed its name column to nothing at 80 columns, `jobq top` lost its last
panels on a 24-line terminal, `jobq stats` offered "q to quit", `jobq cancel --doc` of a document
that does not exist said "nothing to cancel", and `jobq db url` printed a password that psql could
not use (***).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from support import SAMPLES, SCHEMA, jobq_cli

from jobq_workers.documents import enqueue_files
from jobqueue.cli.top import render_text
from jobqueue.observe.snapshot import fetch

GUIDE = str(SAMPLES / "guide.md")
HANDBOOK = str(SAMPLES / "handbook.pdf")
PANELS = ("queues", "throughput", "latency", "workers", "failing types")


@pytest.fixture
def fresh(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("TRUNCATE tasks, documents, batches, chunks, workers RESTART IDENTITY CASCADE")
    return conn


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- jobq docs


def test_docs_at_80_columns_piped_shows_every_name(fresh: psycopg.Connection[Any], tmp_path: Path) -> None:
    long_name = tmp_path / "quarterly-maintenance-report-for-the-north-site.md"
    long_name.write_text("# Report\n\nThe pumps were serviced and the filters replaced on schedule.\n")
    enqueue_files([GUIDE, HANDBOOK, str(long_name)])
    res = jobq_cli("docs", env={"COLUMNS": "80"})  # captured: a pipe, not a terminal
    assert res.returncode == 0, res.stderr
    lines = _lines(res.stdout)
    assert all(len(line) <= 80 for line in lines), res.stdout
    assert "guide.md" in res.stdout and "handbook.pdf" in res.stdout
    assert "quarterly-mainten" in res.stdout.replace("\n", "")  # a long name folds; it does not vanish
    header = next(line for line in lines if line.lstrip().startswith("id"))
    for column in ("name", "status", "progress", "tasks", "chunks", "summaries"):
        assert column in header, header
    wide = jobq_cli("docs", env={"COLUMNS": "160"})
    assert "took" in wide.stdout and "batch" in wide.stdout and "hidden" not in wide.stdout


def test_docs_lists_the_most_recently_enqueued_first(fresh: psycopg.Connection[Any]) -> None:
    first = enqueue_files([GUIDE]).files[0].doc_id
    second = enqueue_files([HANDBOOK]).files[0].doc_id
    names = [m.group(1) for m in re.finditer(r"^\s*\d+\s+(\S+\.(?:md|pdf))\s", jobq_cli("docs").stdout, re.M)]
    assert names == ["handbook.pdf", "guide.md"], names
    # Enqueued again, the guide is the newest again, although its document id is the older one.
    assert jobq_cli("cancel", "--doc", str(first)).returncode == 0
    again = enqueue_files([GUIDE]).files[0]
    assert again.ok and again.doc_id == first < second
    names = [m.group(1) for m in re.finditer(r"^\s*\d+\s+(\S+\.(?:md|pdf))\s", jobq_cli("docs").stdout, re.M)]
    assert names == ["guide.md", "handbook.pdf"], names


# ---------------------------------------------------------------- jobq top / stats

BUSY = """
    INSERT INTO tasks (type, status, run_at)
    SELECT 'display_type_' || t, 'queued', now() - interval '2 minutes'
    FROM generate_series(1, 9) t, generate_series(1, 3);
    INSERT INTO tasks (type, status, run_at, started_at, finished_at, process_duration)
    SELECT 'display_type_' || t, 'done', now() - interval '3 s', now() - interval '2 s',
           now() - i * interval '1 minute', 2
    FROM generate_series(1, 9) t, generate_series(0, 5) i;
    INSERT INTO tasks (type, status, finished_at, started_at, process_duration, last_error)
    SELECT 'display_type_' || t, 'failed', now(), now(), 0.1,
           'KeyError: a rather long error message from deep inside a parser'
    FROM generate_series(1, 9) t;
    INSERT INTO workers (id, host, pid, types, concurrency, done, failed)
    SELECT 'ingest-node-' || w || '.example.internal:123456:abcdef', 'ingest-node-' || w || '.example.internal', 123456,
           '{display_type_1,display_type_2}', 8, 12345, 3
    FROM generate_series(1, 8) w;
"""


def test_top_at_80x24_shows_every_panel(fresh: psycopg.Connection[Any]) -> None:
    fresh.execute(BUSY)
    snap = fetch(fresh, SCHEMA)
    text = render_text(snap, width=80, height=24, live=True)
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), text
    for title in PANELS:
        assert title in text, title
    assert "q to quit" in lines[0]
    # Nine types do not fit: the panel says how many it shows, and the numbers it shows are whole.
    assert re.search(r"queues .*\((\d) of 9\)", text), text
    row = next(line for line in lines if "display_type_1 " in line)
    assert re.search(r"display_type_1\s+3\s+0\s+0\s+0\s+2\.\dm\s+6\s+1\s+0", row), row
    assert "ingest-node-1" in text  # a worker row, its id cut with an ellipsis if need be
    # Without a height (a plain `jobq stats`) every row is there.
    full = render_text(snap, width=80)
    assert all(f"display_type_{t} " in full for t in range(1, 10)) and "of 9)" not in full


def test_stats_is_one_shot_and_does_not_offer_to_quit(fresh: psycopg.Connection[Any]) -> None:
    fresh.execute(BUSY)
    res = jobq_cli("stats", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    assert "q to quit" not in res.stdout
    assert all(title in res.stdout for title in PANELS)
    assert all(len(line) <= 80 for line in res.stdout.splitlines()), res.stdout


# ---------------------------------------------------------------- jobq cancel --doc


def test_cancel_of_an_unknown_document_is_an_error(fresh: psycopg.Connection[Any]) -> None:
    res = jobq_cli("cancel", "--doc", "999999")
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.strip().splitlines() == ["error: no task belongs to document 999999"], res.stderr
    doc = enqueue_files([GUIDE]).files[0].doc_id
    assert jobq_cli("cancel", "--doc", str(doc)).returncode == 0
    again = jobq_cli("cancel", "--doc", str(doc))  # a real document with nothing left to cancel: not an error
    assert again.returncode == 0 and f"every task of document {doc} has finished" in again.stdout


# ---------------------------------------------------------------- jobq db url


@pytest.fixture
def password_url(db_url: str) -> Any:
    """The test database's URL for a role with a password, in the SQLAlchemy form users paste."""
    role, password = f"jobq_url_{uuid.uuid4().hex[:8]}", "s3cret-" + uuid.uuid4().hex[:6]
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    parts = urlsplit(db_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    url = urlunsplit(parts._replace(scheme="postgresql+psycopg", netloc=f"{role}:{password}@{host}"))
    yield url, role, password
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(f"DROP ROLE {role}")


def test_db_url_works_with_psql_and_masks_the_password(password_url: tuple[str, str, str]) -> None:
    url, role, password = password_url
    masked = jobq_cli("db", "url", env={"JOBQ_DATABASE_URL": url})
    assert masked.returncode == 0, masked.stderr
    assert password not in masked.stdout and f"{role}:***@" in masked.stdout
    assert "--show-password" in masked.stderr
    shown = jobq_cli("db", "url", "--show-password", env={"JOBQ_DATABASE_URL": url})
    assert shown.returncode == 0 and shown.stderr == ""
    printed = shown.stdout.strip()
    assert printed.startswith("postgresql://") and password in printed  # the libpq form: no driver suffix
    with psycopg.connect(printed) as c:
        assert c.execute("SELECT current_user").fetchone() == (role,)
    if shutil.which("psql"):
        res = subprocess.run(["psql", printed, "-Atc", "SELECT current_user"], capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 0 and res.stdout.strip() == role, res.stderr
