"""Server time per web-console page on a large history: `python -m bench.console_pages --rows 1000000`.

Creates a scratch database on the server of --dsn, loads test_views' history of --rows finished tasks
(plus 2,000 documents with 200,000 chunks), times each page in-process (median of 5 requests) and
drops the database (unless --keep; --database URL times such a kept one again). Needs the [ui] and
[test] extras (it reuses the tests' loader).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

PAGES = ["/", "/tasks", "/tasks?status=failed&type=type1", "/tasks?before=500000", "/tasks?error=bad+input",
         "/tasks?doc=7", "/tasks/12345", "/documents", "/documents/7", "/workers", "/failures",
         "/api/tasks?status=done&limit=50"]


def load(url: str, rows: int) -> None:
    """test_views' history of `rows` tasks, 2,000 documents (every 97th task a range of one),
    200,000 chunks and one flow-controlled type, analysed as autovacuum would leave them."""
    import psycopg
    from test_views import load_history

    from jobqueue.admin.migrate import migrate

    migrate(url)
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as c:
        load_history(c, rows)
        c.execute("""INSERT INTO documents (name, size, format, kind, parser, pages, content_digest, uri)
                     SELECT 'doc' || i || '.pdf', 10, 'pdf', 'pdf', 'general', 40, md5(i::text), '/x/' || i
                     FROM generate_series(1, 2000) i""")
        c.execute("UPDATE tasks SET doc_id = 1 + id % 2000, from_page = (id % 5) * 8, "
                  "to_page = (id % 5) * 8 + 8 WHERE id % 97 = 0")
        c.execute("""INSERT INTO chunks (doc_id, level, position, from_page, to_page, text, token_count, digest)
                     SELECT 1 + i % 2000, (i % 10 = 0)::int, i / 2000, i % 40, i % 40, 'chunk ' || i, 5,
                            md5(i::text)
                     FROM generate_series(1, 200000) i""")
        # One flow-controlled type, so the overview's flow section reads the view for real.
        c.execute("INSERT INTO flow_rules (type, key, max_per_key) VALUES ('type0', 'owner', 2)")
        for statement in ("VACUUM ANALYZE tasks", "ANALYZE documents", "ANALYZE chunks", "ANALYZE flow_rules"):
            c.execute(statement)
    print(f"loaded {rows} tasks in {time.monotonic() - started:.0f}s")


def time_pages(url: str) -> None:
    """Each page's median and worst of 5 requests, in-process (no network, no browser)."""
    from fastapi.testclient import TestClient

    from jobq_console import create_app

    with TestClient(create_app(url)) as web:
        for path in PAGES:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                r = web.get(path)
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, (path, r.status_code)
            print(f"{path:40s} median {statistics.median(times):7.1f} ms  max {max(times):7.1f} ms")
    print("loadavg", Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true",
                        help="leave the database (its URL is printed) to EXPLAIN a slow page; drop it yourself")
    parser.add_argument("--database", metavar="URL",
                        help="time the pages again on a database a --keep run left (nothing loaded or dropped)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support import create_database, drop_database

    if args.database:
        os.environ["JOBQ_DATABASE_URL"] = args.database
        time_pages(args.database)
        return
    url = create_database(args.dsn, prefix="bench_console")
    os.environ["JOBQ_DATABASE_URL"] = url
    try:
        load(url, args.rows)
        time_pages(url)
    finally:
        if args.keep:
            print(f"kept {url}")
        else:
            drop_database(args.dsn, url)


if __name__ == "__main__":
    main()
