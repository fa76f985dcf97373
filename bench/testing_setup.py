"""``python bench/testing_setup.py``: what jobqueue.testing's fixtures cost (issue 15: first start <= 3 s,
per-test set-up <= 200 ms).

Measured on the plugin's default, the embedded PostgreSQL, in a home of its own (removed at the end):

- first start ever: initdb and start (the plugin keeps its server's home, so this is paid once);
- start of a later session: the server started from its kept home;
- the template: a database migrated to head, once per session;
- a test database: ``CREATE DATABASE ... TEMPLATE`` and its search_path, alone (p50/p95 of --runs);
- a test's set-up as the fixture sees it: ``Databases.take()`` with the next copy made in the
  background while a test body of --body-ms runs (p50/p95).

``--url`` measures the database steps on another server instead (e.g. the machine's PostgreSQL 15).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms, p95 {pct(values, 0.95) * 1000:.0f} ms (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a server's maintenance URL instead of the embedded server")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--body-ms", type=float, default=100.0)
    args = parser.parse_args()

    from jobqueue.admin import embedded
    from jobqueue.testing import Databases, clone_database, create_template, drop_database, start_server

    home = Path(tempfile.mkdtemp(prefix="jobq-bench-testing-"))
    try:
        server = args.url
        if server is None:
            t = time.perf_counter()
            start_server(home)
            print(f"first start ever (initdb + start): {time.perf_counter() - t:.2f} s")
            embedded.stop(home)
            t = time.perf_counter()
            server, _ = start_server(home)
            print(f"start of a later session (kept home): {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        template = create_template(server)
        print(f"template (create + migrate, once per session): {time.perf_counter() - t:.2f} s")
        alone = []
        for _ in range(args.runs):
            t = time.perf_counter()
            url = clone_database(server, template)
            alone.append(time.perf_counter() - t)
            drop_database(server, url)
        print(f"a test database alone (clone + search_path): {ms(alone)}")
        databases = Databases(server, template)
        databases.give_back(databases.take())  # the first copy is made in the foreground
        setups = []
        for _ in range(args.runs):
            t = time.perf_counter()
            url = databases.take()
            setups.append(time.perf_counter() - t)
            time.sleep(args.body_ms / 1000)
            databases.give_back(url)
        print(f"a test's set-up through the fixture (test body {args.body_ms:.0f} ms): {ms(setups)}")
        databases.close()
    finally:
        if args.url is None:
            embedded.stop(home, mode="immediate")
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
