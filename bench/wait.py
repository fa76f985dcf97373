"""``python bench/wait.py``: how soon ``Client.wait`` returns after the completion commits (issue 15:
within 10 ms at p95), and what the completer's NOTIFY on ``<schema>.finished`` costs.

Uses a database of its own, ``bench_wait`` (dropped and re-created, dropped again at the end), on
``--url`` (default: the machine's PostgreSQL 15). Each round enqueues a task, marks it running as a
worker's claim does, starts ``Client.wait`` in a thread (one shared LISTEN in the process), then writes
the completion with the completer's own ``complete_many`` statement and commits. The latency is from
the moment COMMIT returned to the moment ``wait`` returned, on the same clock. ``--poll`` repeats it
with LISTEN off (``JOBQ_WAIT_LISTEN=false``, polling every ``wait_poll_seconds``) for comparison.

``--drain N``: an in-process burst worker drains 10,000 no-op tasks N times with ``complete_many`` as
shipped and N times with its finished NOTIFY taken out, alternating.

The NOTIFY cost: a transaction sending one ``pg_notify('<schema>.finished', <100 ids>)`` (what the
completer adds per batch), alternating with the same transaction without it.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

DATABASE = "bench_wait"
# A claim as runtime.sql's `claim` leaves the row (the bench's own SQL: it stands in for a worker).
CLAIM = ("UPDATE {s}.tasks SET status = 'running', attempt = attempt + 1, worker_id = 'bench', "
         "started_at = now(), lease_expires_at = now() + interval '1 minute' "
         "WHERE id = ANY(%s) RETURNING id, attempt")
# The same write with the NOTIFY in the statement, as complete_many sends it.
WRITE_NOTIFY = ("WITH u AS (UPDATE public.bench_wait_row SET x = x + 1 RETURNING x) "
                "SELECT pg_notify('{s}.finished', %s) FROM u")
# Both transactions of the NOTIFY cost write a row (a completion is a write transaction).
ROW_TABLE = "CREATE TABLE IF NOT EXISTS public.bench_wait_row AS SELECT 0 AS x"
WRITE = "UPDATE public.bench_wait_row SET x = x + 1"
TRUNCATE = "TRUNCATE {s}.tasks, {s}.workers RESTART IDENTITY CASCADE"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(name: str, values: list[float]) -> str:
    return (f"{name}: p50 {statistics.median(values) * 1000:.2f} ms, p95 {pct(values, 0.95) * 1000:.2f} ms, "
            f"max {max(values) * 1000:.2f} ms (n={len(values)})")


def fresh_database(server: str) -> str:
    from jobqueue.admin.migrate import migrate

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    url = urlunsplit(urlsplit(server)._replace(path="/" + DATABASE))
    migrate(url)
    return url


def complete(conn: psycopg.Connection[Any], q: Any, claimed: list[tuple[int, int]]) -> None:
    """The completer's statement for `claimed` (id, attempt), in the caller's transaction."""
    with psycopg.RawCursor(conn) as cur:
        cur.execute(q.complete_many, ([i for i, _ in claimed], [a for _, a in claimed], ["null"] * len(claimed),
                                      ["done"] * len(claimed), 3000, "bench", False))


def wait_then_stamp(client: Any, task_id: int, stamps: list[float]) -> None:
    client.wait(task_id, timeout=30)
    stamps.append(time.perf_counter())


def latencies(url: str, rounds: int, *, listen: bool) -> list[float]:
    from jobqueue import Client
    from jobqueue.db.queries import RuntimeSQL
    from jobqueue.settings import get_settings

    settings = get_settings().model_copy(update={"wait_listen": listen})
    q = RuntimeSQL.load(settings.schema_name)
    out: list[float] = []
    with Client(url, settings=settings) as producer, psycopg.connect(url) as worker:
        for _ in range(rounds):
            tid = producer.enqueue("bench_wait", {})
            claimed = [tuple(r) for r in worker.execute(CLAIM.format(s=settings.schema_name), ([tid],)).fetchall()]
            worker.commit()
            returned: list[float] = []
            waiter = threading.Thread(target=wait_then_stamp, args=(producer, tid, returned))
            waiter.start()
            time.sleep(0.03)  # the waiter has read the row (running) and sleeps until woken
            complete(worker, q, claimed)  # type: ignore[arg-type]
            worker.commit()
            committed = time.perf_counter()
            waiter.join(30)
            out.append(returned[0] - committed)
    return out


def notify_cost(url: str, rounds: int, batch: int = 100) -> tuple[list[float], list[float]]:
    """A write transaction that also sends one NOTIFY of `batch` ids (what complete_many adds per batch),
    alternating with the same transaction without it: the difference is the NOTIFY's cost."""
    from jobqueue.settings import get_settings

    s = get_settings().schema_name
    payload = ",".join(str(10_000_000 + i) for i in range(batch))
    plain: list[float] = []
    notified: list[float] = []
    with psycopg.connect(url) as conn:
        conn.execute(ROW_TABLE)
        conn.commit()
        for i in range(rounds * 2):
            t = time.perf_counter()
            if i % 2:
                conn.execute(WRITE_NOTIFY.format(s=s), (payload,))
            else:
                conn.execute(WRITE)
            conn.commit()
            (notified if i % 2 else plain).append(time.perf_counter() - t)
    return plain, notified


def drain_ab(url: str, rounds: int, n: int = 10_000) -> dict[str, list[float]]:
    """A burst worker draining `n` no-op tasks in this process, with complete_many as shipped and with its
    finished NOTIFY taken out (the statement patched in memory), alternating: jobs/s of each."""
    import asyncio
    import re

    from jobqueue import Client, task
    from jobqueue.db.queries import RuntimeSQL
    from jobqueue.runtime.worker import Worker
    from jobqueue.settings import get_settings

    task("bench_noop", max_retries=0)(_noop)
    s = get_settings().schema_name
    q = RuntimeSQL.load(s)
    shipped = q.complete_many
    without = re.sub(r", finished AS \(.*?GROUP BY f\.part\n\)", "", shipped, flags=re.S)
    without = without.replace(", (SELECT count(*) FROM finished) AS notified", "")
    assert "finished AS" not in without
    out: dict[str, list[float]] = {"as shipped": [], "without the finished NOTIFY": []}
    try:
        with Client(url) as client, psycopg.connect(url, autocommit=True) as conn:
            for r in range(rounds * 2):
                name = list(out)[r % 2]
                q.complete_many = shipped if r % 2 == 0 else without
                conn.execute(TRUNCATE.format(s=s))
                client.enqueue_many("bench_noop", [{}] * n)
                t = time.perf_counter()
                asyncio.run(Worker(["bench_noop"], burst=True, url=url, concurrency=100, maintenance=False).run())
                out[name].append(n / (time.perf_counter() - t))
    finally:
        q.complete_many = shipped
    return out


async def _noop(ctx: Any, payload: Any) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a server's maintenance URL (bench_wait is created there)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--poll", action="store_true", help="also measure with LISTEN off")
    parser.add_argument("--drain", type=int, default=0, metavar="ROUNDS",
                        help="also drain 10,000 no-op tasks with and without the finished NOTIFY, ROUNDS each")
    args = parser.parse_args()
    url = fresh_database(args.url)
    try:
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        print(f"PostgreSQL {version[0] if version else '?'}")
        print(report("wait returns after the commit (LISTEN)", latencies(url, args.rounds, listen=True)))
        if args.poll:
            print(report("wait returns after the commit (polling)", latencies(url, min(args.rounds, 50), listen=False)))
        plain, notified = notify_cost(url, args.rounds * 5)
        print(report("a write transaction without NOTIFY", plain))
        print(report("the same sending one NOTIFY of 100 ids", notified))
        print(f"one finished NOTIFY per completed batch costs about "
              f"{(statistics.median(notified) - statistics.median(plain)) * 1e6:.0f} us (difference of medians)")
        if args.drain:
            for name, rates in drain_ab(url, args.drain).items():
                print(f"drain of 10,000 no-op tasks, {name}: median {statistics.median(rates):,.0f} jobs/s "
                      f"({', '.join(f'{r:,.0f}' for r in rates)})")
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


if __name__ == "__main__":
    main()
