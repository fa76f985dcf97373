"""`jobq enqueue --type` with --run-at, --depends-on, --run-on and --label; `jobq ls --label`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from support import jobq_cli

PAYLOAD = json.dumps({"doc_id": 1, "from_page": 0, "to_page": 1})


def _enqueue(*args: str) -> int:
    r = jobq_cli("enqueue", "--type", "dataflow", "--payload", PAYLOAD, *args)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def test_run_at_depends_on_and_labels(db_url: str, conn: psycopg.Connection[Any], clean: None) -> None:
    later = _enqueue("--run-at", "+10m", "--label", "nightly", "--label", "batch-7")
    at = _enqueue("--run-at", "2031-05-01T12:30:00+02:00")
    child = _enqueue("--depends-on", f"{later},{at}", "--run-on", "always", "--label", "nightly")
    rows = {r[0]: r[1:] for r in conn.execute("SELECT id, run_at, labels, status, depends_on, run_on FROM tasks")}
    assert abs((rows[later][0] - datetime.now(UTC) - timedelta(minutes=10)).total_seconds()) < 60
    assert rows[later][1] == ["nightly", "batch-7"]
    assert rows[at][0] == datetime(2031, 5, 1, 10, 30, tzinfo=UTC)
    assert rows[child][2:] == ("waiting", [later, at], "always")
    r = jobq_cli("ls", "--label", "nightly", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    listed = {int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("│") and
              line.split()[1].isdigit()}
    assert listed == {later, child}


@pytest.mark.parametrize(("args", "message"), [
    (("--run-at", "tomorrow"), "neither an ISO time"),
    (("--run-at", "+10 parsecs"), "--run-at"),
    (("--depends-on", "1,two"), "must be task ids"),
    (("--depends-on", "999999"), "unknown task"),
    (("--run-on", "always"), "needs depends_on"),
    (("--run-at", "+1m", "--delay", "5"), "not both"),
])
def test_bad_options_are_one_line(db_url: str, conn: psycopg.Connection[Any], clean: None,
                                  args: tuple[str, ...], message: str) -> None:
    r = jobq_cli("enqueue", "--type", "dataflow", "--payload", PAYLOAD, *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0  # type: ignore[index]
