"""procrastinate peer driver. Protocol: ``bench/README.md``.

Defaults: ``App.run_worker_async()`` with procrastinate's documented defaults
(concurrency=1, LISTEN/NOTIFY on, psycopg pool of 4). Tuned: ``concurrency`` raised
so several fetch/finish round-trips overlap (and group-commit), with a connection
pool large enough for it. Cancellation uses ``cancel_job_by_id_async(abort=True)``,
which makes the worker cancel the running coroutine (``asyncio.CancelledError``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from importlib.metadata import version
from typing import Any

import procrastinate
import psycopg
from _driverlib import (
    BATCH_SIZE,
    CANCEL_TASKS,
    CONCURRENT_NOTE,
    LATENCY_GAP_S,
    Args,
    EventLog,
    WorkerGroup,
    emit,
    first_start,
    latency_tasks,
    parse_args,
    percentiles_ms,
    read_events,
    start_together,
    throughput,
    unsupported,
    wait_for_events,
)
from procrastinate.tasks import Task
from procrastinate.types import JSONDict

VERSION = version("procrastinate")
TUNED_CONCURRENCY = 4
EVENTS = EventLog()
_seen_first = False


async def noop(i: int) -> None:
    global _seen_first
    if not _seen_first:
        _seen_first = True
        EVENTS.write("first", time.time())


async def stamp(i: int, t: float) -> None:
    EVENTS.write("lat", i, time.time() - t)


async def sleeper(i: int) -> None:
    EVENTS.write("start", i, time.time())
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        EVENTS.write("cancelled", i, time.time())
        raise


def build_app(dsn: str, pool_size: int = 4) -> procrastinate.App:
    connector = procrastinate.PsycopgConnector(conninfo=dsn, min_size=min(4, pool_size), max_size=pool_size)
    app = procrastinate.App(connector=connector)
    app.task(name="noop")(noop)
    app.task(name="stamp")(stamp)
    app.task(name="sleeper")(sleeper)
    return app


def worker_options(tuned: bool, concurrency: int | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if tuned:
        opts["concurrency"] = TUNED_CONCURRENCY
    if concurrency is not None:
        opts["concurrency"] = concurrency
    return opts


async def worker_main(cfg: dict[str, Any]) -> None:
    """Hidden mode: one worker process (``--worker JSON``)."""
    start_together()
    opts: dict[str, Any] = cfg["options"]
    app = build_app(cfg["dsn"], pool_size=max(4, opts.get("concurrency", 1) + 2))
    async with app.open_async():
        await app.run_worker_async(wait=cfg["wait"], **opts)
    EVENTS.write("end", time.time())


def workers(args: Args, options: dict[str, Any], wait: bool, count: int) -> WorkerGroup:
    cfg = json.dumps({"dsn": args.dsn, "options": options, "wait": wait})
    return WorkerGroup([[sys.executable, __file__, "--worker", cfg] for _ in range(count)])


async def main(args: Args) -> dict[str, Any]:
    app = build_app(args.dsn, pool_size=4)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        noop_task = app.tasks["noop"]
        if args.scenario == "enqueue_concurrent":
            return unsupported(args, VERSION, CONCURRENT_NOTE)
        result: dict[str, Any] = {"ok": True, "scenario": args.scenario, "version": VERSION}

        if args.scenario == "enqueue_single":
            t0 = time.perf_counter()
            for i in range(args.n):
                await noop_task.defer_async(i=i)
            result["metric"] = throughput(args.n, time.perf_counter() - t0)
            result["settings"] = {"api": "Task.defer_async, one call per job"}

        elif args.scenario == "enqueue_batch":
            t0 = time.perf_counter()
            await defer_in_batches(noop_task, args.n)
            result["metric"] = throughput(args.n, time.perf_counter() - t0)
            result["settings"] = {"api": f"Task.batch_defer_async, {BATCH_SIZE} jobs per call"}

        elif args.scenario == "drain":
            await defer_in_batches(noop_task, args.n)
            options = worker_options(args.tuned)
            with workers(args, options, wait=False, count=args.processes) as group:
                group.wait(timeout_s=600)
                group.check_alive()
                start_t = first_start(group.events_dir)
                end_t = max(float(f[0]) for f in read_events(group.events_dir, "end"))
            await check_succeeded(args.dsn, args.n)
            result["metric"] = throughput(args.n, end_t - start_t)
            result["settings"] = {"worker": options or "defaults", "processes": args.processes}

        elif args.scenario == "latency":
            options = worker_options(args.tuned)
            with workers(args, options, wait=True, count=1) as group:
                await app.tasks["stamp"].defer_async(i=-1, t=time.time())  # warm-up: worker is listening
                await asyncio.to_thread(wait_for_events, group.events_dir, "lat", 1, 60)
                samples = latency_tasks(args.n)
                for i in range(samples):
                    await app.tasks["stamp"].defer_async(i=i, t=time.time())
                    await asyncio.sleep(LATENCY_GAP_S)
                events = await asyncio.to_thread(wait_for_events, group.events_dir, "lat", samples + 1, 60)
            result["metric"] = percentiles_ms(float(f[1]) for f in events if f[0] != "-1")
            result["settings"] = {"worker": options or "defaults"}

        elif args.scenario == "cancel":
            options = worker_options(args.tuned, concurrency=CANCEL_TASKS)
            with workers(args, options, wait=True, count=1) as group:
                ids = [await app.tasks["sleeper"].defer_async(i=i) for i in range(CANCEL_TASKS)]
                await asyncio.to_thread(wait_for_events, group.events_dir, "start", CANCEL_TASKS, 60)
                samples: list[float] = []
                for i, job_id in enumerate(ids):
                    t0 = time.time()
                    await app.job_manager.cancel_job_by_id_async(job_id, abort=True)
                    seen = await asyncio.to_thread(wait_for_events, group.events_dir, "cancelled", i + 1, 30)
                    stamp_t = next(float(f[1]) for f in seen if f[0] == str(i))
                    samples.append(stamp_t - t0)
            result["metric"] = percentiles_ms(samples)
            result["settings"] = {"worker": options, "api": "JobManager.cancel_job_by_id_async(abort=True)"}
        return result


async def defer_in_batches(task: Task[Any, Any, Any], n: int) -> None:
    for start in range(0, n, BATCH_SIZE):
        batch: list[JSONDict] = [{"i": i} for i in range(start, min(n, start + BATCH_SIZE))]
        await task.batch_defer_async(*batch)


async def check_succeeded(dsn: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
        row = await cur.fetchone()
    if row is None or row[0] != n:
        raise RuntimeError(f"expected {n} succeeded jobs, found {row}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        asyncio.run(worker_main(json.loads(sys.argv[2])))
    else:
        emit(asyncio.run(main(parse_args(sys.argv[1:]))))
