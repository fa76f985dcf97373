"""``python -m bench startup``: how long the read-only CLI commands and a worker take to start.

Each command is run as a user runs it (a fresh ``python -m jobqueue`` process) several times against a
running server, and the median wall time is reported. The worker figure is the time from spawning
``jobq worker --burst`` to its first claim (the task's ``started_at``, read on the same machine's clock).

Start-up is measured here, by repeated runs, and not in timed tests: a loaded CI machine would make
such a test flaky, while a median over repeated runs on a quiet one is a figure worth comparing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

REPO = Path(__file__).resolve().parent.parent
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("ls",),
    ("status", "1"),
    ("cancel", "999999"),
    ("retry", "1"),
    ("docs",),
    ("db", "url"),
    ("stats", "--json"),
)


def _jobq(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobqueue", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return time.perf_counter() - started, proc


def _first_claim(env: dict[str, str], url: str, schema: str) -> float:
    """Seconds from spawning `jobq worker` to the claim of the one queued task."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            f"INSERT INTO {schema}.tasks (type, payload) VALUES ('bench_startup_noop', '{{}}') RETURNING id"
        ).fetchone()
        assert row is not None
        spawned = datetime.now().astimezone()
        subprocess.run([sys.executable, "-m", "jobqueue", "worker", "--types", "bench_startup_noop", "--burst",
                        "--import", "bench.startup_handlers"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=120, check=True)
        got = conn.execute(f"SELECT started_at FROM {schema}.tasks WHERE id = %s", (row[0],)).fetchone()
    assert got is not None and got[0] is not None, "the worker did not claim the task"
    return float((got[0] - spawned).total_seconds())


def run(dsn: str, runs: int) -> dict[str, Any]:
    """Median, min and max wall seconds per command, on a fresh database dropped afterwards."""
    name = f"bench_startup_{uuid.uuid4().hex[:8]}"
    url = urlunsplit(urlsplit(dsn)._replace(path="/" + name))
    schema = os.environ.get("JOBQ_SCHEMA") or "jobq"
    env = {**os.environ, "JOBQ_DATABASE_URL": url, "JOBQ_SCHEMA": schema, "PYTHONPATH": str(REPO)}
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        _, proc = _jobq(env, "migrate")
        if proc.returncode != 0:
            raise SystemExit(f"jobq migrate failed: {proc.stderr.strip()}")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {schema}.tasks (type, payload, status, finished_at) "
                         "SELECT 'bench_startup_noop', '{}', 'done', now() FROM generate_series(1, 50)")
        results: dict[str, Any] = {}
        for args in COMMANDS:
            _jobq(env, *args)  # warm the page cache and .pyc files
            times = [_jobq(env, *args)[0] for _ in range(runs)]
            results["jobq " + " ".join(args)] = times
        _first_claim(env, url, schema)
        results["jobq worker: first claim"] = [_first_claim(env, url, schema) for _ in range(runs)]
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return results


def report(results: dict[str, Any]) -> str:
    runs = len(next(iter(results.values())))
    lines = [f"{'command':<28} {'median':>8} {'min':>8} {'max':>8}   (seconds, {runs} runs)"]
    for label, times in results.items():
        lines.append(f"{label:<28} {statistics.median(times):8.3f} {min(times):8.3f} {max(times):8.3f}")
    return "\n".join(lines)


def main(dsn: str, runs: int) -> int:
    print(report(run(dsn, runs)))
    return 0
