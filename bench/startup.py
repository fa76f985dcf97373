"""``python -m bench startup``: how long the read-only CLI commands and a worker take to start.

Each command is run as a user runs it (a fresh ``python -m jobqueue`` process) several times against a
running server, and the median wall time is reported. The worker figure is the time from spawning
``jobq worker --burst`` to its first claim (the task's ``started_at``, read on the same machine's clock).

``--against REV`` also times the jobq of an earlier commit (its ``jobqueue/`` package, extracted with
``git archive``, first on PYTHONPATH), alternating old and new run by run so both see the same load.

Start-up is measured here, by repeated runs, and not in timed tests: a loaded CI machine would make
such a test flaky, while a median over interleaved runs is a figure worth comparing.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

REPO = Path(__file__).resolve().parent.parent
HANDLERS = "bench_startup_handlers"
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("ls",),
    ("status", "1"),
    ("cancel", "999999"),
    ("retry", "1"),
    ("docs",),
    ("db", "url"),
    ("stats", "--json"),
)
WORKER = "jobq worker: first claim"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _jobq(env: dict[str, str], *args: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one command; CPU time is the figure a loaded machine disturbs least."""
    started, cpu = time.perf_counter(), _cpu()
    subprocess.run([sys.executable, "-m", "jobqueue", *args], env=env, cwd=env["BENCH_TREE"],
                   capture_output=True, text=True, timeout=120)
    return time.perf_counter() - started, _cpu() - cpu


def _first_claim(env: dict[str, str], conn: psycopg.Connection[tuple[object, ...]], schema: str) -> float:
    """Seconds from spawning `jobq worker` to the claim of the one queued task."""
    row = conn.execute(f"INSERT INTO {schema}.tasks (type, payload) VALUES ('bench_startup_noop', '{{}}') "
                       "RETURNING id").fetchone()
    assert row is not None
    spawned = datetime.now().astimezone()
    subprocess.run([sys.executable, "-m", "jobqueue", "worker", "--types", "bench_startup_noop", "--burst",
                    "--import", HANDLERS], env=env, cwd=env["BENCH_TREE"], capture_output=True, text=True,
                   timeout=120, check=True)
    got = conn.execute(f"SELECT started_at FROM {schema}.tasks WHERE id = %s", (row[0],)).fetchone()
    assert got is not None and got[0] is not None, "the worker did not claim the task"
    return float((got[0] - spawned).total_seconds())


def _trees(workdir: Path, against: str | None) -> dict[str, Path]:
    trees = {"this tree": REPO}
    if against:
        old = workdir / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", against, "jobqueue"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees = {against: old, **trees}
    return trees


def run(dsn: str, runs: int, against: str | None = None) -> dict[str, dict[str, list[float]]]:
    """Wall seconds per tree and command, on a fresh database dropped afterwards."""
    name = f"bench_startup_{uuid.uuid4().hex[:8]}"
    url = urlunsplit(urlsplit(dsn)._replace(path="/" + name))
    schema = os.environ.get("JOBQ_SCHEMA") or "jobq"
    with tempfile.TemporaryDirectory(prefix="jobq-startup-") as tmp:
        workdir = Path(tmp)
        shutil.copy(REPO / "bench" / "startup_handlers.py", workdir / f"{HANDLERS}.py")
        trees = _trees(workdir, against)
        # PYTHONDONTWRITEBYTECODE emptied: the warm-up run writes each tree's .pyc files, as an installed
        # jobq has them; with it set (some CI shells do) every run would compile the modules again.
        envs = {label: {**os.environ, "JOBQ_DATABASE_URL": url, "JOBQ_SCHEMA": schema, "BENCH_TREE": str(tree),
                        "PYTHONPATH": os.pathsep.join((str(tree), str(workdir))), "PYTHONDONTWRITEBYTECODE": ""}
                for label, tree in trees.items()}
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            subprocess.run([sys.executable, "-m", "jobqueue", "migrate"], env=envs["this tree"], cwd=REPO,
                           capture_output=True, check=True)
            results: dict[str, dict[str, list[float]]] = {label: {} for label in trees}
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"INSERT INTO {schema}.tasks (type, payload, status, finished_at) "
                             "SELECT 'bench_startup_noop', '{}', 'done', now() FROM generate_series(1, 50)")
                for args in COMMANDS:
                    label_of = "jobq " + " ".join(args)
                    for env in envs.values():
                        _jobq(env, *args)  # warm the page cache and .pyc files
                    for _ in range(runs):
                        for label, env in envs.items():
                            wall, cpu = _jobq(env, *args)
                            results[label].setdefault(label_of, []).append(wall)
                            results[label].setdefault(label_of + " (CPU)", []).append(cpu)
                for env in envs.values():
                    _first_claim(env, conn, schema)
                for _ in range(runs):
                    for label, env in envs.items():
                        results[label].setdefault(WORKER, []).append(_first_claim(env, conn, schema))
        finally:
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return results


def report(results: dict[str, dict[str, list[float]]], runs: int) -> str:
    labels = list(results)
    head = f"{'command':<28}" + "".join(f" {label[:12]:>12}" for label in labels)
    load = os.getloadavg()[0]
    lines = [f"median seconds over {runs} interleaved runs ({os.cpu_count()} cores, load average {load:.1f}); "
             "(CPU) = user + system time of the process", head]
    for command in sorted(results[labels[-1]], key=lambda c: (c.endswith("(CPU)"), c == WORKER)):
        lines.append(f"{command:<28}" + "".join(f" {statistics.median(results[label][command]):12.3f}"
                                               for label in labels))
    return "\n".join(lines)


def main(dsn: str, runs: int, against: str | None = None) -> int:
    print(report(run(dsn, runs, against), runs))
    return 0
