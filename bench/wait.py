"""``python bench/wait.py``: how soon ``Client.wait`` returns after the completion commits (issue 15:
within 10 ms at p95), and what the completer's NOTIFY on ``<schema>.finished`` costs.

Uses a database of its own, ``bench_wait`` (dropped and re-created, dropped again at the end), on
``--url`` (default: the machine's PostgreSQL 15). Each round enqueues a task, marks it running as a
worker's claim does, starts ``Client.wait`` in a thread (one shared LISTEN in the process), then writes
the completion with the completer's own ``complete_many`` statement and commits. The latency is from
the moment COMMIT returned to the moment ``wait`` returned, on the same clock. ``--poll`` repeats it
with LISTEN off (``JOBQ_WAIT_LISTEN=false``, polling every ``wait_poll_seconds``) for comparison.

The NOTIFY cost: a transaction that runs ``complete_many`` for a batch of 100 running tasks (which sends
one ``pg_notify('<schema>.finished', ids)``), alternating with the same plus one more such NOTIFY.
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
NOTIFY = "SELECT pg_notify('{s}.finished', %s)"


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
                                      ["done"] * len(claimed), 3000, "bench"))


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
    """complete_many for `batch` tasks per transaction (it sends one NOTIFY on finished), alternating with
    the same plus one more such NOTIFY: the difference is what that NOTIFY adds to a batch's commit."""
    from jobqueue import Client
    from jobqueue.db.queries import RuntimeSQL
    from jobqueue.settings import get_settings

    s = get_settings().schema_name
    q = RuntimeSQL.load(s)
    plain: list[float] = []
    extra: list[float] = []
    with Client(url) as producer, psycopg.connect(url) as conn:
        for i in range(rounds * 2):
            ids = producer.enqueue_many("bench_wait", [{}] * batch)
            claimed = [tuple(r) for r in conn.execute(CLAIM.format(s=s), (ids,)).fetchall()]
            conn.commit()
            t = time.perf_counter()
            complete(conn, q, claimed)  # type: ignore[arg-type]
            if i % 2:
                conn.execute(NOTIFY.format(s=s), (",".join(map(str, ids)),))
            conn.commit()
            (extra if i % 2 else plain).append(time.perf_counter() - t)
    return plain, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a server's maintenance URL (bench_wait is created there)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--poll", action="store_true", help="also measure with LISTEN off")
    args = parser.parse_args()
    url = fresh_database(args.url)
    try:
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        print(f"PostgreSQL {version[0] if version else '?'}")
        print(report("wait returns after the commit (LISTEN)", latencies(url, args.rounds, listen=True)))
        if args.poll:
            print(report("wait returns after the commit (polling)", latencies(url, min(args.rounds, 50), listen=False)))
        plain, extra = notify_cost(url, max(args.rounds // 4, 20))
        print(report("complete_many of 100 tasks + commit (as shipped)", plain))
        print(report("the same with one more NOTIFY like it", extra))
        print(f"one NOTIFY per batch costs about {(statistics.median(extra) - statistics.median(plain)) * 1000:.2f} "
              "ms (difference of medians)")
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


if __name__ == "__main__":
    main()
