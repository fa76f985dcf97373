"""``python -m bench.flow --dsn URL --profile short|full``: flow control measured (issue 14).

Runs in its own database ``bench_flow`` (dropped and created again; never ``bench_jobq``), with
worker processes as an operator starts them (``jobq worker --import bench.flow_handlers``):

- plan: the plain claim on 200k+ queued rows stays the partial claim index scan, and the fair claim
  uses the type's key index (its scans counted in pg_stat_user_indexes); one claim of 16 of each, ms;
- drain: one worker process draining no-op tasks of five tenants, plain type against a fair one;
- starvation: tenant A holds 10,000 queued tasks of 1 s and keeps every slot (2 x 8) busy; tenant B enqueues one:
  how long until it starts (started_at - created_at, the database's clock), p50/p99 over the trials;
- fairness: five tenants with backlogs 10/100/1k/5k/10k: Jain's index of the running slot-seconds
  of each 1 s window while all five are backlogged;
- rate: 50/s on a type, 4 worker processes, backlogged: the most tasks started in any 1 s window
  (aligned and sliding, from started_at in SQL) and the share of the quota used;
- limit: 3 per owner while a worker is killed with SIGKILL every 2 s (and another started): the most
  tasks of one owner running at once, from the rows' started/finished intervals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

from bench.environment import Server
from bench.schema import SCHEMA, use_schema

REPO = Path(__file__).resolve().parent.parent
DATABASE = "bench_flow"
PROFILES: dict[str, dict[str, Any]] = {
    "short": {"trials": 20, "rate_seconds": 20, "limit_seconds": 20, "fair_windows": 4, "drain": 5000},
    "full": {"trials": 100, "rate_seconds": 120, "limit_seconds": 120, "fair_windows": 8, "drain": 20000},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def workers(url: str, types: str, n: int, concurrency: int, **env: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`n` worker processes; stopped (SIGTERM, then SIGKILL) on the way out."""
    full_env = {**os.environ, "JOBQ_DATABASE_URL": url, "JOBQ_SCHEMA": SCHEMA, **env}

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "jobqueue", "worker", "--types", types, "--import",
                                 "bench.flow_handlers", "--concurrency", str(concurrency)],
                                env=full_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs = [start() for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def reset(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE tasks, workers, queues, flow_rules, flow_grants RESTART IDENTITY CASCADE")


def copy_tasks(conn: psycopg.Connection[Any], task_type: str, owners: list[tuple[str, int]], seconds: float) -> None:
    """Queue tasks by COPY, tenants interleaved at random (as uploads arrive)."""
    rows = [owner for owner, n in owners for _ in range(n)]
    random.shuffle(rows)
    payload = json.dumps({"s": seconds})
    with conn.cursor().copy("COPY tasks (type, owner, payload) FROM STDIN") as cp:
        for owner in rows:
            cp.write_row((task_type, owner, payload))


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# ------------------------------------------------------------------ plan


def plan(url: str, conn: psycopg.Connection[Any]) -> dict[str, Any]:
    from jobqueue.db.queries import RuntimeSQL

    reset(conn)
    copy_tasks(conn, "bf_plain", [("t", 200_000)], 0)
    copy_tasks(conn, "bf_fair", [(f"tenant{i}", 40_000) for i in range(5)], 0)
    conn.execute("ANALYZE tasks")
    q = RuntimeSQL.load(SCHEMA)
    out: dict[str, Any] = {}

    def explain(sql: str, args: str) -> str:
        conn.execute(f"PREPARE p AS {sql}")
        try:
            return "\n".join(r[0] for r in conn.execute(f"EXPLAIN EXECUTE p({args})"))
        finally:
            conn.execute("DEALLOCATE p")

    plain = explain(q.claim, "ARRAY['bf_plain'], ARRAY[16], 16, 'w', 60, ARRAY[]::text[]")
    out["plain_plan_uses_claim_index"] = "tasks_claim_idx" in plain

    out["claim_ms"] = asyncio.run(_timed_claims(url))
    fair = one(conn, "SELECT index_name FROM flow_rules WHERE type = 'bf_fair'")

    def scans() -> int:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(one(conn, "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s", fair))

    # The fair claim runs inside the function claim_flow: its index use shows in the statistics.
    out["fair_claim_uses_key_index"] = wait_until(lambda: scans() > 0, 30, 0.2)
    out["plain_plan"] = plain
    return out


async def _timed_claims(url: str) -> dict[str, float]:
    """Median ms of one claim of 16 (plain, then fair), each rolled back so the backlog stays 200k."""
    from jobqueue.runtime.worker import Worker

    times: dict[str, float] = {}
    for task_type in ("bf_plain", "bf_fair"):
        w = Worker([task_type], name=f"bench-{task_type}", url=url, concurrency=16, lease_seconds=600)
        c = await asyncpg.connect(url)
        spent: list[float] = []
        try:
            await w.flow.declare(c, w.id)
            for _ in range(60):
                tx = c.transaction()
                await tx.start()
                started = time.perf_counter()
                rows = await w.fetcher._claim(c, {task_type: 16}, 16)
                spent.append(time.perf_counter() - started)
                await tx.rollback()
                assert len(rows) == 16, len(rows)
        finally:
            await c.close()
        times[task_type] = round(statistics.median(spent) * 1000, 2)
    return times


# ------------------------------------------------------------------ drain


def drain(url: str, conn: psycopg.Connection[Any], n: int) -> dict[str, Any]:
    """Tasks per second of one `jobq worker --burst` draining `n` no-op tasks of five tenants: the
    plain claim against the fair one (the flow claim's cost, where every task is a claim's worth)."""
    out: dict[str, Any] = {}
    env = {**os.environ, "JOBQ_DATABASE_URL": url, "JOBQ_SCHEMA": SCHEMA}
    for task_type in ("bf_plain", "bf_fair", "bf_plain", "bf_fair"):
        reset(conn)
        copy_tasks(conn, task_type, [(f"tenant{i}", n // 5) for i in range(5)], 0)
        conn.execute("VACUUM ANALYZE tasks")
        subprocess.run([sys.executable, "-m", "jobqueue", "worker", "--types", task_type, "--import",
                        "bench.flow_handlers", "--concurrency", "16", "--burst"], env=env, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=True)
        secs = one(conn, "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM tasks")
        out.setdefault(task_type, []).append(round(n / float(secs)))
    return {"tasks": n, "per_s": out}


# ------------------------------------------------------------------ starvation


STARTED = "SELECT started_at IS NOT NULL FROM tasks WHERE id = %s"


def starvation(url: str, conn: psycopg.Connection[Any], trials: int) -> dict[str, Any]:
    reset(conn)
    copy_tasks(conn, "bf_fair", [("A", 10_000)], 1.0)
    waits: list[float] = []
    busy_seen: list[int] = []
    with workers(url, "bf_fair", 2, 8):
        wait_until(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'running'") >= 16, 60)
        for _ in range(trials):
            queued = one(conn, "SELECT count(*) FROM tasks WHERE status = 'queued' AND owner = 'A'")
            if queued < 10_000:
                copy_tasks(conn, "bf_fair", [("A", 10_000 - queued)], 1.0)
            busy = one(conn, "SELECT count(*) FROM tasks WHERE status = 'running'")
            tid = one(conn, "INSERT INTO tasks (type, owner, payload) VALUES ('bf_fair', 'B', '{\"s\": 0}') "
                            "RETURNING id")
            wait_until(lambda tid=tid: one(conn, STARTED, tid), 30, 0.01)
            waits.append(one(conn, "SELECT extract(epoch FROM started_at - created_at) FROM tasks WHERE id = %s", tid))
            busy_seen.append(busy)  # the slots really were A's
            time.sleep(random.uniform(0.05, 0.2))
    waits.sort()
    return {"trials": trials, "p50_s": round(waits[len(waits) // 2], 3),
            "p99_s": round(waits[min(len(waits) - 1, int(len(waits) * 0.99))], 3), "max_s": round(waits[-1], 3),
            "a_running_at_enqueue_min": min(busy_seen),
            "a_running_at_enqueue_mean": round(statistics.mean(busy_seen), 1)}


# ------------------------------------------------------------------ fairness


def fairness(url: str, conn: psycopg.Connection[Any], windows: int) -> dict[str, Any]:
    reset(conn)
    backlogs = [("t10", 10), ("t100", 100), ("t1k", 1000), ("t5k", 5000), ("t10k", 10_000)]
    # The smallest tenant stays backlogged for about `windows` seconds at a fair share of 16 slots.
    seconds = windows * 16 / 5 / 10
    copy_tasks(conn, "bf_fair", backlogs, seconds)
    with workers(url, "bf_fair", 2, 8):
        wait_until(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'queued' AND owner = 't10'") == 0,
                   120, 0.1)
        time.sleep(seconds)
    rows = conn.execute("""
        WITH span AS (
            SELECT min(started_at) AS t0,
                   (SELECT max(started_at) FROM tasks WHERE owner = 't10') AS t1 FROM tasks
        ), win AS (
            SELECT g AS w0, g + interval '1 s' AS w1
            FROM span, generate_series(span.t0, span.t1 - interval '1 s', interval '1 s') g
        )
        SELECT w.w0, t.owner,
               sum(extract(epoch FROM least(w.w1, COALESCE(t.finished_at, now())) - greatest(w.w0, t.started_at)))
        FROM win w JOIN tasks t ON t.started_at < w.w1 AND COALESCE(t.finished_at, now()) > w.w0
        GROUP BY 1, 2 ORDER BY 1""").fetchall()
    per: dict[Any, dict[str, float]] = {}
    for w0, owner, secs in rows:
        per.setdefault(w0, {})[owner] = float(secs)
    jain = []
    for shares in per.values():
        xs = [shares.get(o, 0.0) for o, _ in backlogs]
        if sum(xs) > 0:
            jain.append(sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)))
    return {"windows": len(jain), "jain_min": round(min(jain), 3) if jain else None,
            "jain_mean": round(statistics.mean(jain), 3) if jain else None, "task_seconds": seconds}


# ------------------------------------------------------------------ rate


def rate(url: str, conn: psycopg.Connection[Any], seconds: int) -> dict[str, Any]:
    reset(conn)
    copy_tasks(conn, "bf_rate", [("r", int(50 * seconds * 1.5) + 200)], 0)
    with workers(url, "bf_rate", 4, 8):
        wait_until(lambda: one(conn, "SELECT count(*) FROM tasks WHERE started_at IS NOT NULL") > 0, 60)
        time.sleep(seconds)
    audit = conn.execute("""
        WITH s AS (SELECT started_at FROM tasks WHERE started_at IS NOT NULL),
        span AS (SELECT min(started_at) AS t0 FROM s),
        steady AS (SELECT s.started_at FROM s, span WHERE s.started_at >= span.t0 + interval '1 s'
                   AND s.started_at < span.t0 + make_interval(secs => %s))
        SELECT (SELECT max(n) FROM (SELECT count(*) AS n FROM s GROUP BY date_trunc('second', started_at)) a),
               (SELECT max(n) FROM (SELECT (SELECT count(*) FROM s b WHERE b.started_at >= a.started_at
                                            AND b.started_at < a.started_at + interval '1 s') AS n FROM s a) x),
               (SELECT count(*) FROM steady)""", (seconds,)).fetchone()
    assert audit is not None
    aligned, sliding, steady = audit
    used = steady / (50 * (seconds - 1))
    return {"seconds": seconds, "limit_per_s": 50, "max_aligned_1s": aligned, "max_sliding_1s": sliding,
            "quota_used": round(used, 3)}


# ------------------------------------------------------------------ limit under SIGKILL


def limit(url: str, conn: psycopg.Connection[Any], seconds: int) -> dict[str, Any]:
    reset(conn)
    rng = random.Random(7)
    with conn.cursor().copy("COPY tasks (type, owner, payload) FROM STDIN") as cp:
        for i in range(6000):
            cp.write_row(("bf_limit", f"o{i % 4}", json.dumps({"s": rng.uniform(0.05, 0.3)})))
    env = {"JOBQ_LEASE_SECONDS": "2", "JOBQ_HEARTBEAT_SECONDS": "0.5"}
    kills = 0
    max_live = 0
    with workers(url, "bf_limit", 4, 4, **env) as procs:
        full_env = {**os.environ, "JOBQ_DATABASE_URL": url, "JOBQ_SCHEMA": SCHEMA, **env}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(2)
            live = one(conn, "SELECT COALESCE(max(n), 0) FROM (SELECT count(*) AS n FROM tasks "
                             "WHERE status = 'running' GROUP BY owner) x")
            max_live = max(max_live, live)
            victim = rng.randrange(len(procs))
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait(10)
            kills += 1
            procs[victim] = subprocess.Popen(procs[victim].args, env=full_env, cwd=REPO,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worst = one(conn, """
        WITH ev AS (
            SELECT owner, started_at AS at, 1 AS d FROM tasks WHERE finished_at IS NOT NULL
            UNION ALL SELECT owner, finished_at, -1 FROM tasks WHERE finished_at IS NOT NULL
        )
        SELECT max(running) FROM (SELECT sum(d) OVER (PARTITION BY owner ORDER BY at, d) AS running FROM ev) s""")
    done = one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'")
    rescued = one(conn, "SELECT count(*) FROM tasks WHERE requeue_reason = 'lost'")
    return {"seconds": seconds, "limit": 3, "kills": kills, "max_running_per_owner_audit": worst,
            "max_running_per_owner_sampled": max_live, "done": done, "tasks_rescued": rescued}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flow", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="an admin postgresql:// URL (bench_flow is created next to it)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--only", nargs="*", default=["plan", "drain", "starvation", "fairness", "rate", "limit"])
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    from jobqueue.admin.migrate import migrate

    server = Server(args.dsn)
    url = server.recreate_database(DATABASE)
    os.environ["JOBQ_DATABASE_URL"] = url
    migrate(url)
    use_schema(url)
    import bench.flow_handlers  # noqa: F401  (the types, for the in-process claims of `plan`)

    results: dict[str, Any] = {"profile": args.profile}
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            runs = {
                "plan": lambda: plan(url, conn),
                "drain": lambda: drain(url, conn, profile["drain"]),
                "starvation": lambda: starvation(url, conn, profile["trials"]),
                "fairness": lambda: fairness(url, conn, profile["fair_windows"]),
                "rate": lambda: rate(url, conn, profile["rate_seconds"]),
                "limit": lambda: limit(url, conn, profile["limit_seconds"]),
            }
            for name in args.only:
                log(f"bench.flow: {name} ...")
                results[name] = runs[name]()
                log(f"bench.flow: {name}: {json.dumps(results[name], default=str)[:400]}")
    finally:
        server.drop_database(DATABASE)
    results.get("plan", {}).pop("plain_plan", None)
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
