"""``python -m bench profile``: the worker's CPU per no-op task (issue 12, target 1: <= 20 us).

N no-op async tasks are queued in a fresh database, then one burst Worker drains them in this very
process; the figure is this process's CPU time (``time.process_time()``, user + system, every thread)
over the drain divided by N. CPU time, unlike wall time, is barely moved by other load on the machine,
so the figure is comparable across runs of a busy machine (within a few percent). ``--cprofile``
also prints the functions that take the most time (cProfile's own overhead inflates the total).

    python -m bench profile [--n 20000] [--concurrency 100] [--dsn URL] [--cprofile]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any

from jobqueue import Client, Context, task
from jobqueue.admin.migrate import migrate
from jobqueue.runtime.worker import Worker, new_event_loop

from .environment import Server

DATABASE = "bench_profile"
TYPE = "bench_profile_noop"


@task(TYPE, max_retries=0)
async def noop(ctx: Context, payload: Any) -> None:
    return None


def main(dsn: str, n: int, concurrency: int, with_cprofile: bool) -> int:
    server = Server(dsn)
    url = server.recreate_database(DATABASE)
    try:
        migrate(url)
        client = Client(url)
        try:
            for start in range(0, n, 1000):
                client.enqueue_many(TYPE, [{"i": i} for i in range(start, min(n, start + 1000))])
        finally:
            client.close()
        loop = new_event_loop()
        worker = Worker([TYPE], url=url, burst=True, concurrency=concurrency, maintenance=False, grace_seconds=0)
        profiler = cProfile.Profile() if with_cprofile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        loop.run_until_complete(worker.run())
        if profiler is not None:
            profiler.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        loop.close()
    finally:
        server.drop_database(DATABASE)
    done = worker.stats.done
    print(f"drained {done:,} no-op tasks in one worker (concurrency {concurrency}): "
          f"{cpu / max(1, done) * 1e6:.1f} us CPU per task, wall {wall:.2f} s ({done / wall:,.0f} jobs/s), "
          f"claims {worker.stats.claims}, most unwritten acks {getattr(worker.stats, 'max_unwritten', 'n/a')}")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    return 0 if done == n else 1
