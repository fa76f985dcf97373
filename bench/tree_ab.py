"""``python -m bench.tree_ab --dsn URL [--rounds N] NAME=COMMIT ...``: the plain path of several trees, interleaved.

Issue 14's "with none of these features configured, drain and claim latency stay within 10% of the
previous figures" compares trees, not settings: each commit (``current`` for the working tree) is
exported with ``git archive`` to a temporary directory and run from there (``PYTHONPATH``; its
migrations are its own), against its own database ``bench_ab_<name>`` migrated by that tree. Rounds
alternate the trees (A, B, A, B) so load drifts on a shared machine hit them alike:

- claim: median of 60 claims of 16 on a 200,000-task backlog of one type without flow control,
  each rolled back (the worker's own ``Fetcher._claim``), ms;
- drain: one ``jobq worker --burst --concurrency 16`` draining 20,000 no-op tasks, tasks/s from
  the rows' ``min(started_at)`` to ``max(finished_at)``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from bench.environment import REPO_ROOT, Server

HANDLERS = '''
from jobqueue import task


@task("ab_plain")
async def ab_plain(ctx, payload=None):
    return None
'''

CLAIM = r'''
import asyncio, os, statistics, time
import asyncpg
import bench_ab_handlers  # noqa: F401
from jobqueue.runtime.worker import Worker


async def main():
    url = os.environ["JOBQ_DATABASE_URL"]
    w = Worker(["ab_plain"], name="ab", url=url, concurrency=16, lease_seconds=600)
    c = await asyncpg.connect(url)
    spent = []
    for _ in range(60):
        tx = c.transaction()
        await tx.start()
        t0 = time.perf_counter()
        rows = await w.fetcher._claim(c, {"ab_plain": 16}, 16)
        spent.append(time.perf_counter() - t0)
        await tx.rollback()
        assert len(rows) == 16
    print(statistics.median(spent) * 1000)

asyncio.run(main())
'''

FILL = "INSERT INTO tasks (type, owner, payload) SELECT 'ab_plain', 't' || (g %% 5), '{}' FROM generate_series(1, %s) g"


class Tree:
    """One tree: where its code is, its database, and how to run Python against them."""

    def __init__(self, name: str, code: Path | None, url: str, handlers: Path) -> None:
        self.name, self.code, self.url, self.handlers = name, code, url, handlers

    def env(self) -> dict[str, str]:
        path = [str(self.code)] if self.code else []
        return {**os.environ, "JOBQ_DATABASE_URL": self.url, "JOBQ_SCHEMA": "jobq",
                "PYTHONPATH": os.pathsep.join([*path, str(self.handlers)])}

    def python(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], env=self.env(), cwd=self.handlers, text=True,
                              check=True, **kw)

    def fill(self, n: int) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.url, autocommit=True)
        conn.execute("SET search_path = jobq")
        conn.execute("TRUNCATE tasks RESTART IDENTITY CASCADE")
        conn.execute(FILL, (n,))
        conn.execute("VACUUM ANALYZE tasks")
        return conn

    def claim_ms(self) -> float:
        self.fill(200_000).close()
        return float(self.python("-c", CLAIM, capture_output=True).stdout.strip())

    def drain_per_s(self, n: int) -> float:
        with self.fill(n) as conn:
            self.python("-m", "jobqueue", "worker", "--types", "ab_plain", "--import", "bench_ab_handlers",
                        "--concurrency", "16", "--burst", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        timeout=600)
            row = conn.execute("SELECT count(*) FILTER (WHERE status = 'done'), "
                               "extract(epoch FROM max(finished_at) - min(started_at)) FROM tasks").fetchone()
            assert row is not None and row[0] == n, row
            return n / float(row[1])


def export(commit: str, into: Path) -> Path:
    """The tree of `commit`, its migrations where its ``jobqueue.migrations`` finds them."""
    into.mkdir()
    archive = subprocess.run(["git", "archive", commit], cwd=REPO_ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    link = into / "jobqueue" / "migrations"
    if not link.exists():
        link.symlink_to(into / "migrations")
    return into


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tree_ab", description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", required=True, help="an admin postgresql:// URL")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--drain", type=int, default=20_000)
    ap.add_argument("trees", nargs="+", help="NAME=COMMIT (COMMIT 'current': the working tree)")
    args = ap.parse_args(argv)
    server = Server(args.dsn)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="jobq-tree-ab-") as tmp:
        handlers = Path(tmp) / "handlers"
        handlers.mkdir()
        (handlers / "bench_ab_handlers.py").write_text(HANDLERS)
        trees = []
        for spec in args.trees:
            name, commit = spec.split("=", 1)
            code = None if commit == "current" else export(commit, Path(tmp) / name)
            tree = Tree(name, code, server.recreate_database(f"bench_ab_{name}"), handlers)
            tree.python("-c", "from jobqueue.admin.migrate import migrate; migrate()")
            trees.append(tree)
            results[name] = {"claim_ms": [], "drain_per_s": [], "load": []}
        try:
            for what in ("claim_ms", "drain_per_s"):
                for r in range(args.rounds):
                    for tree in trees:
                        value = tree.claim_ms() if what == "claim_ms" else tree.drain_per_s(args.drain)
                        load = float(Path("/proc/loadavg").read_text().split()[0])
                        results[tree.name][what].append(round(value, 3))
                        results[tree.name]["load"].append(load)
                        print(f"bench.tree_ab: {what} round {r} {tree.name}: {value:.3f} (load {load})",
                              file=sys.stderr, flush=True)
        finally:
            for tree in trees:
                server.drop_database(f"bench_ab_{tree.name}")
    summary = {name: {"claim_ms_median": statistics.median(v["claim_ms"]),
                      "drain_per_s_median": statistics.median(v["drain_per_s"]), **v}
               for name, v in results.items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
