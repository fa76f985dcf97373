"""What each constraint, index and trigger of ``tasks`` costs a batch enqueue, per row, on the server.

``python -m bench.enqueue_cost [--dsn URL] [--n 20000] [--rounds 7]``

On a scratch database migrated to head, the COPY that ``enqueue_many`` sends for a batch of bare
payloads (client.sql ``copy_tasks_bare``, the same text) is timed as the table is, and then without
each of its constraints, indexes and triggers in turn: each is dropped inside a transaction that is
rolled back, so the next variant starts from the full table again. Variants are interleaved within a
round (the machine's load drifts over a run) and the median of the rounds is kept. Two more variants put
back the pre-0014 forms (the bounded-repetition type check, the payload CHECK) to show what 0014 saves.

Only the server's work is timed, as the CPU time of its backend process (see backend_clock): the COPY
text is made before the clock starts, and nothing commits (the commit's WAL flush is per batch, not
per row).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from jobqueue.admin.migrate import migrate
from jobqueue.client import encode
from jobqueue.settings import Settings

from .environment import Server

DATABASE = "bench_enqueue_cost"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
TYPE = "noop"
OLD_FORMS = {
    "old tasks_type_check (bounded regex)": [
        "ALTER TABLE jobq.tasks DROP CONSTRAINT tasks_type_check",
        "ALTER TABLE jobq.tasks ADD CONSTRAINT tasks_type_check CHECK (type ~ '^[A-Za-z0-9_.:-]{1,48}$')"],
    "old tasks_payload_check (CHECK)": [
        "DROP TRIGGER tasks_payload_check ON jobq.tasks",
        "ALTER TABLE jobq.tasks ADD CONSTRAINT tasks_payload_check CHECK (octet_length(payload::text) <= 2097152)"],
}


def variants(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """Each variant's name and the DDL that makes it, in the rolled-back transaction."""
    out: dict[str, list[str]] = {"as migrated": []}
    for (name,) in conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = 'jobq.tasks'::regclass "
                                "AND contype = 'c' ORDER BY conname").fetchall():
        out[f"without CHECK {name}"] = [f"ALTER TABLE jobq.tasks DROP CONSTRAINT {name}"]
    for (name, constraint) in conn.execute(
            "SELECT i.relname, c.conname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid "
            "AND c.contype IN ('p', 'u') WHERE x.indrelid = 'jobq.tasks'::regclass ORDER BY 1").fetchall():
        drop = f"DROP INDEX jobq.{name}"
        if constraint:  # the primary key: its foreign keys go with it, and come back at the rollback
            drop = f"ALTER TABLE jobq.tasks DROP CONSTRAINT {constraint} CASCADE"
        out[f"without index {name}"] = [drop]
    for (name,) in conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'jobq.tasks'::regclass "
                                "AND NOT tgisinternal ORDER BY 1").fetchall():
        out[f"without trigger {name}"] = [f"DROP TRIGGER {name} ON jobq.tasks"]
    out.update(OLD_FORMS)
    return out


def backend_clock(conn: psycopg.Connection[Any]) -> Callable[[], float]:
    """The CPU seconds the server's backend process has run (/proc/PID/schedstat, in ns): unlike wall
    time, what the other processes of a shared machine do hardly moves it. Wall time when the server is
    not on this machine."""
    path = Path(f"/proc/{conn.info.backend_pid}/schedstat")
    if not path.exists():
        return time.perf_counter
    return lambda: int(path.read_text().split()[0]) / 1e9


def copy_seconds(conn: psycopg.Connection[Any], clock: Callable[[], float], ddl: list[str], data: bytes) -> float:
    with conn.transaction(force_rollback=True):
        for statement in ddl:
            conn.execute(statement)
        with conn.cursor() as cur:
            t0 = clock()
            with cur.copy(f"COPY jobq.tasks ({', '.join(encode.BARE_COLUMNS)}) FROM STDIN") as copy:
                copy.write(data)
            return clock() - t0


def main(dsn: str, n: int, rounds: int) -> int:
    server = Server(dsn)
    url = server.recreate_database(DATABASE)
    try:
        migrate(url)
        settings = Settings(database_url=url)
        bare = encode.BareCopy(TYPE, settings)
        data = bare.lines(range(1, n + 1), bare.payloads([{"i": i} for i in range(n)]))
        with psycopg.connect(url, autocommit=True) as conn:
            found = variants(conn)
            clock = backend_clock(conn)
            conn.execute("VACUUM jobq.tasks")
            times: dict[str, list[float]] = {name: [] for name in found}
            saves: dict[str, list[float]] = {name: [] for name in found}
            for _ in range(rounds):
                for name, ddl in found.items():
                    # Paired with a run of the full table just before it: the load of a shared machine
                    # drifts by more than most of these cost.
                    base = copy_seconds(conn, clock, [], data)
                    # Each COPY starts from an empty heap and indexes: a rolled-back one leaves dead rows
                    # and index entries that make the next one slower.
                    conn.execute("VACUUM jobq.tasks")
                    times[name].append(copy_seconds(conn, clock, ddl, data))
                    saves[name].append(base - times[name][-1])
                    conn.execute("VACUUM jobq.tasks")
        print(f"COPY of {n:,} bare rows into jobq.tasks, median of {rounds} rounds; server CPU µs per row, and what"
              " the variant saves against the full table timed just before it (median of the pairs)")
        print(f"{'variant':<52} {'µs/row':>7} {'saves':>7}")
        for name, values in times.items():
            per_row, saved = (statistics.median(v) / n * 1e6 for v in (values, saves[name]))
            print(f"{name:<52} {per_row:7.2f} {saved:7.2f}")
    finally:
        server.drop_database(DATABASE)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.enqueue_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="admin URL; a scratch database is made and dropped there")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    raise SystemExit(main(args.dsn, args.n, args.rounds))
