"""The "collapse" configuration of issue 12: history in the table, statistics taken before anything ran,
two worker processes at concurrency 500.

A fresh database gets the schema, ANALYZE on the empty tasks table (autovacuum off for it, as on a server
with ``autovacuum = off``), then ``--history`` finished rows; then ``jobq_driver.py drain`` drains N no-op
tasks with ``--processes`` workers at ``--concurrency``, while the rows ``running`` are counted every 0.25 s.
Prints one JSON line: the drain's metric, the most rows ``running`` at once, and the final status counts.

    python -m bench.stale_stats --dsn postgresql://postgres@127.0.0.1:5432/test [--n 40000] [--history 300000]
        [--tree DIR]   (DIR's jobqueue/ instead of this one: PYTHONPATH for the driver and its workers)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg

from bench.environment import REPO_ROOT, Server, driver_path
from bench.history import LOAD_HISTORY

DATABASE = "bench_stale_stats"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--history", type=int, default=300_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--tree", default=str(REPO_ROOT))
    args = ap.parse_args()
    server = Server(args.dsn)
    url = server.recreate_database(DATABASE)
    env = {**os.environ, "PYTHONPATH": args.tree, "BENCH_JOBQ_CONCURRENCY": str(args.concurrency)}
    subprocess.run([sys.executable, "-c", f"from jobqueue.admin.migrate import migrate; migrate({url!r})"],
                   env=env, check=True, cwd=args.tree)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("SET search_path = jobq, public")
        c.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
        c.execute("ANALYZE tasks")  # statistics of an empty table, never refreshed
        c.execute(LOAD_HISTORY, (args.history,))
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        with psycopg.connect(url, autocommit=True) as c:
            while not stop.is_set():
                row = c.execute("SELECT count(*) FROM jobq.tasks WHERE status = 'running'").fetchone()
                peak = max(peak, row[0] if row else 0)
                time.sleep(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(driver_path("jobq")), "drain", str(args.n), str(args.processes),
                               "1", url], env=env, capture_output=True, text=True, cwd=driver_path("jobq").parent,
                              timeout=900)
    finally:
        stop.set()
        sampler.join()
    out: dict[str, Any] = {"wall_s": round(time.monotonic() - started, 1), "most_running": peak,
                           "driver_exit": proc.returncode}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out["metric"] = json.loads(lines[-1]).get("metric") if lines else None
    if proc.returncode:
        out["error"] = proc.stderr.strip()[-300:]
    with psycopg.connect(url, autocommit=True) as c:
        out["statuses"] = dict(c.execute("SELECT status, count(*) FROM jobq.tasks WHERE created_at > now() - "
                                         "interval '1 hour' GROUP BY 1").fetchall())
    server.drop_database(DATABASE)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
