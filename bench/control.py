"""Bulk control by selector (issue 14): cancel 10,000 queued and running tasks of one tenant in one
statement, and measure how soon the running ones stop.

    python -m bench.control --dsn postgresql://postgres@127.0.0.1:5432/postgres

In its own database (``bench_control``, dropped and created again; never ``bench_jobq``): a history
of finished rows (so the selector is not run on a toy table), 10,000 tasks of tenant ``acme`` and
1,000 of tenant ``other``, and worker processes (bench/control_handlers.py: a handler that sleeps
until cancelled) until ``--running`` of acme's tasks are running. The workers' heartbeat is set to
30 s, so only the cancel NOTIFY can reach the running tasks within the window measured. Then
``Client.cancel_where(owner="acme")`` runs once and the report gives:

- the statement's wall time from the client, and the rows it matched (queued cancelled at once,
  running told);
- for the running ones, when their row became ``cancelled`` (``finished_at``, the worker's completion,
  an upper bound on when the handler saw it): after the cancel's start (``cancel_requested_at``, both
  the database's clock; includes the statement itself) and after its commit (when a LISTEN of the
  bench's own heard the first cancel NOTIFY, on the same host's clock); p50, p95, max;
- that tenant ``other``'s tasks were untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from bench.history import LOAD_HISTORY
from bench.schema import SCHEMA, use_schema

REPO = Path(__file__).resolve().parent.parent
DATABASE = "bench_control"


def _one(c: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = c.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def _p95(sorted_values: list[float]) -> float:
    return sorted_values[max(0, int(len(sorted_values) * 0.95) - 1)]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _first_cancel_notify(url: str, heard: list[float]) -> None:
    """Stamp (this host's clock) the first NOTIFY on the cancel channel: the cancel's commit as a
    worker's LISTEN sees it."""
    from jobqueue.states import cancel_channel

    with psycopg.connect(url, autocommit=True) as c:
        c.execute(sql.SQL("LISTEN {}").format(sql.Identifier(cancel_channel(SCHEMA))))
        for _ in c.notifies(timeout=30, stop_after=1):
            heard.append(time.time())


def fresh_database(dsn: str) -> str:
    from jobqueue.admin.migrate import migrate

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{DATABASE}"')
    url = urlunsplit(urlsplit(dsn)._replace(path="/" + DATABASE))
    migrate(url)
    use_schema(url)
    return url


def run(url: str, *, tasks: int, running: int, workers: int, history: int) -> dict[str, Any]:
    from jobqueue import Client

    with psycopg.connect(url, autocommit=True) as c:
        c.execute(LOAD_HISTORY, (history,))
        c.execute("INSERT INTO tasks (type, owner) SELECT 'ctl_bench', 'acme' FROM generate_series(1, %s)",
                  (tasks,))
        c.execute("INSERT INTO tasks (type, owner) SELECT 'ctl_bench', 'other' FROM generate_series(1, 1000)")
        c.execute("VACUUM ANALYZE tasks")
        # only acme's tasks may be claimed: the other tenant's stay queued (what the selector must not touch)
        c.execute("UPDATE tasks SET run_at = now() + interval '1 day' WHERE owner = 'other'")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQ_") or k == "JOBQ_SCHEMA"}
    env.update(JOBQ_DATABASE_URL=url, JOBQ_HEARTBEAT_SECONDS="30", JOBQ_LEASE_SECONDS="120",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    per_worker = -(-running // workers)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jobqueue", "worker", "--types", "ctl_bench", "--import", "bench.control_handlers",
         "--concurrency", str(per_worker), "--name", f"control-{i}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO) for i in range(workers)]
    try:
        with psycopg.connect(url, autocommit=True) as c:
            deadline = time.monotonic() + 120
            while _one(c, "SELECT count(*) FROM tasks WHERE status = 'running'") < per_worker * workers:
                if time.monotonic() > deadline:
                    raise SystemExit("the workers did not take their tasks within 120 s")
                time.sleep(0.2)
            before = dict(c.execute("SELECT status, count(*) FROM tasks WHERE owner = 'acme' GROUP BY 1").fetchall())
        heard: list[float] = []
        listener = threading.Thread(target=_first_cancel_notify, args=(url, heard), daemon=True)
        listener.start()
        time.sleep(0.5)  # listening before the cancel
        with Client(url) as client:
            client.queues()  # connect first: the timing is the statement's
            t0 = time.perf_counter()
            result = client.cancel_where(owner="acme")
            statement_s = time.perf_counter() - t0
        listener.join(30)
        # the commit as the workers see it: the first cancel NOTIFY, heard by a LISTEN of our own
        committed = heard[0] if heard else time.time()
        with psycopg.connect(url, autocommit=True) as c:
            deadline = time.monotonic() + 60
            while _one(c, "SELECT count(*) FROM tasks WHERE owner = 'acme' AND status = 'running'"):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            rows = c.execute("SELECT extract(epoch FROM finished_at - cancel_requested_at)::float8, "
                             "extract(epoch FROM finished_at)::float8 FROM tasks "
                             "WHERE owner = 'acme' AND attempt > 0 AND status = 'cancelled'").fetchall()
            seen = [float(r[0]) for r in rows]  # from the cancel's start (its transaction's now())
            # from its commit: the database and this process share the host's clock
            after_commit = [float(r[1]) - committed for r in rows]
            load = os.getloadavg()[0]
            after = dict(c.execute("SELECT status, count(*) FROM tasks WHERE owner IS NOT NULL "
                                   "GROUP BY status").fetchall())
            other = dict(c.execute("SELECT status, count(*) FROM tasks WHERE owner = 'other' GROUP BY 1").fetchall())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    seen.sort()
    after_commit.sort()
    return {
        "history_rows": history, "acme_before": before, "matched": len(result),
        "cancelled_at_once": sum(1 for s in result.values() if s == "cancelled"),
        "running_told": sum(1 for s in result.values() if s == "running"),
        "statement_ms": round(statement_s * 1000, 1),
        "running_stopped": len(seen),
        "stop_ms_p50": _ms(statistics.median(seen)) if seen else None,
        "stop_ms_p95": _ms(_p95(seen)) if seen else None,
        "stop_ms_max": _ms(seen[-1]) if seen else None,
        "stop_after_commit_ms_p50": _ms(statistics.median(after_commit)) if after_commit else None,
        "stop_after_commit_ms_p95": _ms(_p95(after_commit)) if after_commit else None,
        "load_average_1m": round(load, 1),
        "after": after, "other_untouched": other == {"queued": 1000},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("JOBQ_TEST_DATABASE_URL")
                    or "postgresql://postgres@127.0.0.1:5432/postgres", help="any database of the server")
    ap.add_argument("--tasks", type=int, default=10_000, help="acme's tasks (queued and running)")
    ap.add_argument("--running", type=int, default=400, help="of which running when the cancel is sent")
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument("--history", type=int, default=200_000, help="finished rows already in the table")
    args = ap.parse_args(argv)
    url = fresh_database(args.dsn)
    try:
        report = run(url, tasks=args.tasks, running=args.running, workers=args.workers, history=args.history)
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    print(json.dumps(report, indent=2))
    ok = (report["matched"] == args.tasks and report["statement_ms"] < 1000 and report["other_untouched"]
          and report["stop_after_commit_ms_p95"] is not None and report["stop_after_commit_ms_p95"] <= 250)
    print("OK" if ok else "NOT OK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
