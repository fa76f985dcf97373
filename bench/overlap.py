"""Overlap scenario of issue 11: many running tasks whose heartbeats, progress flushes and
completions overlap, on a table holding a large history.

``python -m bench.overlap --profile full`` loads >= 300,000 finished rows, VACUUM ANALYZEs, enqueues
10,000 `ov_work` tasks (bench/overlap_handlers.py: four progress reports each) and runs several
``jobq worker`` processes with short intervals (heartbeat 0.2 s, progress flush 0.05 s, many slots)
until every task is finished. Nothing is killed: every extra attempt is the worker's own doing.
It then reports, from PostgreSQL itself:

- deadlocks: ``pg_stat_database.deadlocks`` of the run's database, before vs after (the server
  counts every ``deadlock detected`` it reports in its log);
- tasks failed, and tasks ever taken back by the rescuer (the rescuer's "worker ... lost; task
  rescued" line in their log);
- extra executions: ``sum(attempt - 1)`` (each claim is an attempt);
- the workers' own log lines at WARNING and above.

The ``prefetch`` profile drains 50,000 near-instant tasks with 4 slots a worker, so most tasks a
worker holds were claimed ahead of a free slot. The ``short`` profile (tests/test_overlap.py) runs
the same on 30,000 history rows and 1,000 tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.history import LOAD_HISTORY
from bench.schema import use_schema

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Profile:
    history: int
    tasks: int
    workers: int
    concurrency: int
    heartbeat: float = 0.2
    progress: float = 0.05
    lease: float = 2.0  # short, so a heartbeat that stopped shows up as rescues within the run
    sleep: float = 0.05  # each of the handler's four steps sleeps up to this
    timeout: float = 900.0


PROFILES = {
    "full": Profile(history=300_000, tasks=10_000, workers=4, concurrency=250),
    # Handlers far shorter than a claim at low concurrency: each worker holds up to JOBQ_PREFETCH tasks
    # claimed ahead of its 4 slots, renewed by the same 0.2 s heartbeats (runtime/prefetch.py).
    "prefetch": Profile(history=300_000, tasks=50_000, workers=4, concurrency=4, sleep=0.0),
    "short": Profile(history=30_000, tasks=1_000, workers=2, concurrency=100, timeout=180.0),
}


@dataclass
class Report:
    profile: str
    history_rows: int = 0
    tasks: int = 0
    seconds: float = 0.0
    deadlocks: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    lost: int = 0
    extra_attempts: int = 0
    worker_exits: list[int] = field(default_factory=list)
    worker_warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.deadlocks == 0 and self.failed == 0 and self.lost == 0 and self.extra_attempts == 0
                and self.by_status == {"done": self.tasks + self.history_rows})


def _one(c: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = c.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def _deadlocks(c: psycopg.Connection[Any]) -> int:
    c.execute("SELECT pg_stat_clear_snapshot()")
    return int(_one(c, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))


def run(url: str, profile: Profile, name: str, logdir: Path) -> Report:
    """Run the scenario on the (migrated, empty) database at `url`."""
    report = Report(profile=name, history_rows=profile.history, tasks=profile.tasks)
    use_schema(url)
    with psycopg.connect(url, autocommit=True) as c:
        if profile.history:
            c.execute(LOAD_HISTORY, (profile.history,))
        c.execute("VACUUM ANALYZE tasks")
        with c.cursor() as cur:
            cur.executemany("INSERT INTO tasks (type, payload) VALUES ('ov_work', %s)",
                            [(json.dumps({"i": i, "sleep": profile.sleep}),) for i in range(profile.tasks)])
        c.execute("ANALYZE tasks")
        before = _deadlocks(c)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQ_") or k == "JOBQ_SCHEMA"}
    env.update(JOBQ_DATABASE_URL=url, JOBQ_HEARTBEAT_SECONDS=str(profile.heartbeat),
               JOBQ_PROGRESS_INTERVAL=str(profile.progress), JOBQ_LEASE_SECONDS=str(profile.lease),
               JOBQ_KEEP_DONE_DAYS="3650",  # the history must stay: it is what makes the plans realistic
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    procs = []
    t0 = time.monotonic()
    for i in range(profile.workers):
        log = open(logdir / f"overlap-{i}.log", "wb")  # noqa: SIM115 - owned by the child from here on
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jobqueue", "worker", "--types", "ov_work", "--import", "bench.overlap_handlers",
             "--concurrency", str(profile.concurrency), "--burst", "--name", f"overlap-{i}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        log.close()
    deadline = t0 + profile.timeout
    for p in procs:
        try:
            report.worker_exits.append(p.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            report.worker_exits.append(p.wait())
    report.seconds = round(time.monotonic() - t0, 1)
    with psycopg.connect(url, autocommit=True) as c:
        report.deadlocks = _deadlocks(c) - before
        report.by_status = {str(s): int(n) for s, n in c.execute("SELECT status, count(*) FROM tasks GROUP BY 1")}
        report.failed = int(_one(c, "SELECT count(*) FROM tasks WHERE type = 'ov_work' AND status = 'failed'"))
        # the rescuer's own log line (written by every version, so runs of older commits compare)
        report.lost = int(_one(c, "SELECT count(*) FROM tasks WHERE type = 'ov_work' "
                                  "AND strpos(progress_msg, 'lost; task rescued') > 0"))
        report.extra_attempts = int(_one(c, "SELECT coalesce(sum(attempt - 1), 0) FROM tasks WHERE type = 'ov_work'"))
    for i in range(profile.workers):
        text = (logdir / f"overlap-{i}.log").read_text(errors="replace")
        report.worker_warnings += [ln for ln in text.splitlines()
                                   if any(level in ln for level in ("WARNING", "ERROR", "CRITICAL", "Traceback"))]
    return report


@contextmanager
def database(server_url: str) -> Iterator[str]:
    from jobqueue.admin.migrate import migrate

    name = f"jobq_overlap_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(server_url)._replace(path="/" + name))
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def render(r: Report) -> str:
    lines = [f"overlap run ({r.profile}): {r.tasks} tasks on {r.history_rows} history rows in {r.seconds} s",
             f"deadlocks (pg_stat_database): {r.deadlocks}",
             f"failed: {r.failed}; taken back as 'worker lost': {r.lost}; extra attempts: {r.extra_attempts}",
             f"statuses: {r.by_status}; worker exit codes: {r.worker_exits}",
             f"worker log lines at WARNING or above: {len(r.worker_warnings)}"]
    lines += [f"  {w}" for w in r.worker_warnings[:10]]
    lines.append("OK" if r.ok else "NOT OK")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="short")
    ap.add_argument("--server-url", default=os.environ.get("JOBQ_TEST_DATABASE_URL")
                    or "postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--json", action="store_true", help="print the report as JSON too")
    args = ap.parse_args(argv)
    with database(args.server_url) as url, tempfile.TemporaryDirectory(prefix="jobq-overlap-") as tmp:
        report = run(url, PROFILES[args.profile], args.profile, Path(tmp))
    print(render(report))
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
