"""`jobq top` and `jobq stats`: a frame rendered to a string, the JSON, and the live command in a
pseudo-terminal quitting on q and on Ctrl-C."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

import psycopg
import pytest
from support import REPO, SCHEMA, jobq_cli

from jobqueue.cli.top import render_text, sparkline
from jobqueue.observe.snapshot import fetch


@pytest.fixture(scope="module")
def history(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("""
            INSERT INTO tasks (type, status, run_at)
            SELECT 'top_a', 'queued', now() - interval '2 minutes'
            FROM generate_series(1, 3);
            INSERT INTO tasks (type, status, run_at)
            VALUES ('top_a', 'queued', now() + interval '1 hour');
            INSERT INTO tasks (type, status, worker_id, started_at, lease_expires_at)
            VALUES ('top_a', 'running', 'w-top', now(), now() + interval '30 s');
            INSERT INTO tasks (type, status, run_at, started_at, finished_at, process_duration)
            SELECT 'top_b', 'done', now() - interval '3 s', now() - interval '2 s',
                   now() - i * interval '1 minute', 2
            FROM generate_series(0, 9) i;
            INSERT INTO tasks (type, status, finished_at, started_at, process_duration, last_error)
            VALUES ('top_b', 'failed', now(), now(), 0.1, 'KeyError: ''page_42''');
            INSERT INTO workers (id, host, pid, types, concurrency, done, failed, abandoned)
            VALUES ('w-top', 'host-1', 4242, '{top_a,top_b}', 8, 10, 1, 2);
        """)
    return db_url


def test_frame_renders_every_panel(history: str) -> None:
    with psycopg.connect(history, autocommit=True) as c:
        snap = fetch(c, SCHEMA)
    text = render_text(snap, width=160)
    for title in ("queues", "throughput", "latency", "workers", "failing types"):
        assert title in text
    row = next(line for line in text.splitlines() if "top_a" in line and "runnable" not in line)
    # type, runnable, scheduled, waiting, running, oldest wait (2 minutes)
    assert re.search(r"top_a\s+3\s+1\s+0\s+1\s+2\.\dm", row), row
    worker = next(line for line in text.splitlines() if "w-top" in line)
    # ... running, done, failed, expired, stuck (threads past their hard timeout)
    assert re.search(r"w-top\s+host-1\s+4242\s+top_a,top_b\s+alive\s+.*\s1\s+10\s+1\s+0\s+2\s+│", worker), worker
    assert "stuck" in text
    assert "KeyError: 'page_N'" in text
    spark = next(line for line in text.splitlines() if "top_b" in line and any(ch in line for ch in "▁█"))
    assert "█" in spark and "10" in spark


def test_sparkline_scales_to_the_busiest_minute() -> None:
    assert sparkline([0, 1, 2, 4]) == "▁▃▅█"
    assert sparkline([0, 0]) == "▁▁"


def test_stats_json_matches_the_views(history: str) -> None:
    res = jobq_cli("stats", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    queues = {q["type"]: q for q in doc["queues"]}
    assert (queues["top_a"]["runnable"], queues["top_a"]["scheduled"], queues["top_a"]["running"]) == (
        3,
        1,
        1,
    )
    assert (queues["top_b"]["done_last_hour"], queues["top_b"]["failed_last_hour"]) == (10, 1)
    assert sum(m["done"] for m in doc["throughput"]["top_b"]) == 10
    assert len(doc["throughput"]["top_b"]) == 60
    assert [(w["worker_id"], w["abandoned"]) for w in doc["workers"]] == [("w-top", 2)]
    assert doc["failures"][0]["error"] == "KeyError: 'page_N'"
    assert {(r["type"], r["period"]) for r in doc["latency"]} >= {("top_b", "5m"), ("top_b", "1h")}
    text = jobq_cli("stats", "--width", "150")
    assert text.returncode == 0 and "top_a" in text.stdout and "w-top" in text.stdout


def _run_in_pty(db_url: str, keys: bytes) -> tuple[int, bytes, float]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))

    def controlling_tty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = {
        **os.environ,
        "JOBQ_DATABASE_URL": db_url,
        "TERM": "xterm-256color",
        "COLUMNS": "160",
        "LINES": "50",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobqueue", "top"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=REPO,
        env=env,
        preexec_fn=controlling_tty,
        close_fds=True,
    )
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 30
        frames = 0
        while time.monotonic() < deadline and frames < 2:  # two refreshes, then the key
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                out += chunk
                frames = out.count(b"failing types")
        assert frames >= 2, out[-2000:]
        os.write(master, keys)
        sent = time.monotonic()
        code = proc.wait(timeout=10)
        took = time.monotonic() - sent
        while True:
            r, _, _ = select.select([master], [], [], 0.1)
            if not r:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, out, took


@pytest.mark.parametrize("keys", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_top_is_live_and_quits_cleanly(history: str, keys: bytes) -> None:
    code, out, took = _run_in_pty(history, keys)
    assert code == 0, out[-2000:]
    assert took < 3
    assert b"\x1b[?1049h" in out and b"\x1b[?1049l" in out  # entered and left the alternate screen
    assert b"top_a" in out and b"Traceback" not in out


MARKUP_ROWS = """
    INSERT INTO tasks (type, status, finished_at, started_at, process_duration, last_error)
    VALUES ('top_m', 'failed', now(), now(), 0.1, 'ValueError: bad [/] tag [bold]x[/bold] [link=y]');
    INSERT INTO workers (id, host, pid, types, concurrency)
    VALUES ('w[/]m', 'host[/red]', 4343, '{top_m}', 1);
"""


def test_text_from_the_database_is_never_markup(history: str) -> None:
    """Issue 11 item 19: an error, worker id or host holding `[/]` crashed stats and top (MarkupError)."""
    with psycopg.connect(history, autocommit=True) as c:
        c.execute(MARKUP_ROWS)
    try:
        res = jobq_cli("stats", "--width", "200")
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
        for literal in ("w[/]m", "host[/red]", "bad [/] tag [bold]x[/bold]"):
            assert literal in res.stdout, res.stdout
        code, out, _ = _run_in_pty(history, b"q")
        assert code == 0 and b"Traceback" not in out and b"MarkupError" not in out, out[-2000:]
        assert b"w[/]m" in out
    finally:
        with psycopg.connect(history, autocommit=True) as c:
            c.execute("DELETE FROM tasks WHERE type = 'top_m'; DELETE FROM workers WHERE id = 'w[/]m'")
