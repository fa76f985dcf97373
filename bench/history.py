"""Does jobq stay fast as history grows? Drain rate and claim-statement time with 0, 1M and 10M
finished tasks in the tasks table, and an optional soak at a steady enqueue rate that reports dead
tuples and the claim index size over time (with or without a transaction pinning the xmin horizon).

    python -m bench.history --dsn postgresql://postgres@127.0.0.1:5432/test [--profile short|full]
    python -m bench.history --dsn ... --sizes 0,1000000 --repeat 3
    python -m bench.history --dsn ... --soak-minutes 30 [--hold-xmin-minutes 10] [--out DIR]

Each history size gets a fresh database; finished rows are written with generate_series (done,
finished over the last 6 days, inside the pruner's 7-day retention so that the
worker's pruner leaves them alone during the drain), then ANALYZE; then 20,000 no-op tasks are drained by one worker
process and the claim statement is timed on its own (EXPLAIN ANALYZE, median of 20).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.schema import SCHEMA, use_schema
from jobqueue.admin.migrate import migrate
from jobqueue.db.queries import RuntimeSQL

PEERS = Path(__file__).resolve().parent / "peers"
DRIVER = PEERS / "jobq_driver.py"

LOAD_HISTORY = """
INSERT INTO tasks (type, status, payload, progress, created_at, started_at, finished_at, run_at, attempt,
                        process_duration, result)
SELECT 'noop', 'done', '{"i": 0}', 1, now() - interval '6 days' + g * interval '50 ms',
       now() - interval '6 days' + g * interval '50 ms', now() - interval '6 days' + g * interval '50 ms',
       now() - interval '6 days', 1, 0.001, NULL
FROM generate_series(1, %s) AS g
"""


def with_db(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


def fresh_db(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    url = with_db(dsn, name)
    migrate(url)
    use_schema(url)
    return url


def claim_time_ms(url: str) -> float:
    """Median execution time of the claim statement (batch of 100) as the server reports it."""
    q = RuntimeSQL.load(SCHEMA)
    samples = []
    with psycopg.connect(url) as c:
        cur = psycopg.RawCursor(c)
        for _ in range(20):
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + q.claim, (["noop"], [100], 100, "bench", 30.0, []))
            plan = cur.fetchone()
            assert plan is not None
            samples.append(float(plan[0][0]["Execution Time"]))
            c.rollback()
    return statistics.median(samples)


def drain(url: str, n: int) -> float:
    out = subprocess.run([sys.executable, str(DRIVER), "drain", str(n), "1", "0", url], cwd=PEERS,
                         capture_output=True, text=True, timeout=900, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["metric"]["jobs_per_s"])


def server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as c:
        row = c.execute("SHOW server_version").fetchone()
        assert row is not None
        return str(row[0])


def history_run(dsn: str, sizes: list[int], n: int) -> list[dict[str, Any]]:
    results = []
    for size in sizes:
        url = fresh_db(dsn, "bench_history")
        t0 = time.monotonic()
        with psycopg.connect(url, autocommit=True) as c:
            if size:
                c.execute(LOAD_HISTORY, (size,))
            c.execute("VACUUM ANALYZE tasks")
        load_s = time.monotonic() - t0
        rate = drain(url, n)
        # Then the claim statement alone, on a fresh backlog, in transactions that are rolled back.
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("INSERT INTO tasks (type) SELECT 'noop' FROM generate_series(1, 20000)")
            c.execute("ANALYZE tasks")
        claim_ms = claim_time_ms(url)
        results.append({"finished_rows": size, "claim_ms": round(claim_ms, 3), "drain_jobs_per_s": rate,
                        "load_s": round(load_s, 1)})
        print(json.dumps(results[-1]), flush=True)
    return results


class ClaimProbe(threading.Thread):
    """Times the claim statement as a worker runs it, a few times a second, in its own thread, so a
    slow claim (a held xmin) never holds up the soak's steady enqueue.

    A probe claims one task like a worker (same statement, SKIP LOCKED, so it never waits for the
    real worker) and is rolled back, so the soak's accounting of done rows is untouched."""

    def __init__(self, url: str, gap_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.url, self.gap_s = url, gap_s
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        q = RuntimeSQL.load(SCHEMA)
        with psycopg.connect(self.url) as conn:
            cur = psycopg.RawCursor(conn)
            while not self.stop.wait(self.gap_s):
                cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + q.claim, (["noop"], [1], 1, "soak-probe", 30.0, []))
                plan = cur.fetchone()
                assert plan is not None
                self.samples.append(float(plan[0][0]["Execution Time"]))
                conn.rollback()

    def take_p99(self) -> float:
        """p99 of the probes since the last call (the list is swapped, not shared, between windows)."""
        window, self.samples = self.samples, []
        window.sort()
        return window[min(len(window) - 1, int(0.99 * len(window)))] if window else float("nan")


SOAK_SAMPLE = """
SELECT n_dead_tup, pg_relation_size('tasks_claim_idx'), pg_relation_size('tasks'),
       (SELECT count(*) FROM tasks WHERE status = 'queued'),
       (SELECT count(*) FROM tasks WHERE status = 'done')
FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass
"""


def soak(dsn: str, minutes: float, rate: int, hold_minutes: float, every_s: float = 30.0) -> list[dict[str, Any]]:
    """Steady enqueue at `rate`/s with one worker draining, optionally with a transaction pinning the
    xmin horizon for the first `hold_minutes`. Every `every_s`: the window's throughput (done rows
    per second), the claim statement's p99 (rolled-back probes), dead tuples, table and claim index
    size and the backlog (a window's rate falls below `rate` only if the worker falls behind, which
    the backlog then shows). The issue's test: the last 10 minutes against the first minute."""
    url = fresh_db(dsn, "bench_soak")
    worker = subprocess.Popen([sys.executable, "-m", "jobqueue", "worker", "--types", "noop", "--import",
                               "jobq_driver"], cwd=PEERS, env={**__import__("os").environ, "JOBQ_DATABASE_URL": url,
                                                               "PYTHONPATH": str(PEERS)})
    stop = threading.Event()
    samples: list[dict[str, Any]] = []

    def hold() -> None:
        with psycopg.connect(url) as c:
            c.execute("SELECT txid_current()")
            stop.wait(hold_minutes * 60)
            c.rollback()

    holder = threading.Thread(target=hold, daemon=True)
    if hold_minutes:
        holder.start()
    probe = ClaimProbe(url)
    probe.start()
    started = time.monotonic()
    try:
        with psycopg.connect(url, autocommit=True) as c:
            nxt = started
            last_t, last_done = started, 0
            while time.monotonic() - started < minutes * 60:
                c.execute("INSERT INTO tasks (type) SELECT 'noop' FROM generate_series(1, %s)", (rate // 10,))
                nxt += 0.1
                time.sleep(max(0.0, nxt - time.monotonic()))
                if time.monotonic() - last_t >= every_s:
                    p99 = probe.take_p99()
                    now = time.monotonic()
                    row = c.execute(SOAK_SAMPLE).fetchone()
                    assert row is not None
                    samples.append({"t_s": round(now - started), "jobs_per_s": round((row[4] - last_done)
                                                                                      / (now - last_t), 1),
                                    "claim_p99_ms": round(p99, 3), "dead_tuples": row[0],
                                    "claim_index_bytes": row[1], "table_bytes": row[2], "queued": row[3],
                                    "done": row[4], "xmin_held": bool(hold_minutes)
                                    and now - started < hold_minutes * 60,
                                    "loadavg": float(Path("/proc/loadavg").read_text().split()[0])})
                    last_t, last_done = now, row[4]
                    print(json.dumps(samples[-1]), flush=True)
    finally:
        probe.stop.set()
        stop.set()
        worker.terminate()
        worker.wait(30)
    return samples


def soak_verdict(samples: list[dict[str, Any]], hold_minutes: float) -> dict[str, Any]:
    """The issue's comparison: the last 10 minutes against the first minute, and dead tuples after
    the hold (bounded: the last sample no higher than the highest within the first ten minutes
    after the hold ended)."""
    first = [s for s in samples if s["t_s"] <= 60] or samples[:1]
    end = samples[-1]["t_s"]
    last = [s for s in samples if s["t_s"] > end - 600]
    med = statistics.median
    out: dict[str, Any] = {
        "first_minute": {"jobs_per_s": med(s["jobs_per_s"] for s in first),
                         "claim_p99_ms": med(s["claim_p99_ms"] for s in first)},
        "last_10_minutes": {"jobs_per_s": med(s["jobs_per_s"] for s in last),
                            "claim_p99_ms": med(s["claim_p99_ms"] for s in last)},
    }
    for key in ("jobs_per_s", "claim_p99_ms"):
        out[f"{key}_ratio"] = round(out["last_10_minutes"][key] / max(out["first_minute"][key], 1e-9), 3)
    after = [s for s in samples if s["t_s"] > hold_minutes * 60]
    if after:
        out["dead_tuples_after_hold"] = {"max": max(s["dead_tuples"] for s in after),
                                         "last": after[-1]["dead_tuples"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", required=True, help="a server where databases may be created")
    ap.add_argument("--profile", choices=["short", "full"], default="short")
    ap.add_argument("--soak-minutes", type=float, default=0)
    ap.add_argument("--soak-rate", type=int, default=2000, help="tasks enqueued per second during the soak")
    ap.add_argument("--hold-xmin-minutes", type=float, default=0)
    ap.add_argument("--sizes", help="comma-separated history sizes instead of the profile's, e.g. 0,1000000")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each size, one after the other")
    ap.add_argument("--sample-seconds", type=float, default=30.0, help="soak: seconds between samples")
    ap.add_argument("--out", type=Path, help="directory for soak.json (`python -m bench plots DIR` draws it)")
    args = ap.parse_args()
    if args.soak_minutes:
        samples = soak(args.dsn, args.soak_minutes, args.soak_rate, args.hold_xmin_minutes, args.sample_seconds)
        doc = {"soak": samples, "verdict": soak_verdict(samples, args.hold_xmin_minutes),
               "rate": args.soak_rate, "hold_xmin_minutes": args.hold_xmin_minutes,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "server": server_version(args.dsn)}
        print(json.dumps(doc))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "soak.json").write_text(json.dumps(doc, indent=1))
        return
    sizes = [0, 1_000_000, 10_000_000] if args.profile == "full" else [0, 100_000]
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    sizes = [size for size in sizes for _ in range(args.repeat)]
    print(json.dumps({"history": history_run(args.dsn, sizes, 20_000 if args.profile == "full" else 2_000)}))


if __name__ == "__main__":
    main()
