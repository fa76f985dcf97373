"""PgQueuer peer driver. Protocol: ``bench/README.md``.

Workers are ``PgQueuer(AsyncpgDriver(conn))`` run with ``PgQueuer.run`` on uvloop, as
PgQueuer's own CLI (``pgq run``) does. Defaults: ``run()``'s documented defaults
(batch_size=10, unlimited concurrency). Tuned: a larger ``batch_size`` so one dequeue
and one status flush cover many jobs. Tables stay at the default (and only fully
durable) ``Durability.durable``; the ``balanced``/``volatile`` modes make tables
UNLOGGED and are therefore not used. Cancellation uses
``Queries.mark_job_as_cancelled`` and the job's ``Context.cancellation`` scope.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from importlib.metadata import version
from typing import Any

import asyncpg
import uvloop
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
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, PgQueuer, Queries
from pgqueuer.models import Context, Job
from pgqueuer.types import QueueExecutionMode

VERSION = version("pgqueuer")
TUNED_BATCH_SIZE = 100
EVENTS = EventLog()


def register(pgq: PgQueuer) -> None:
    seen_first = False

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        nonlocal seen_first
        if not seen_first:
            seen_first = True
            EVENTS.write("first", time.time())

    @pgq.entrypoint("stamp")
    async def stamp(job: Job) -> None:
        assert job.payload is not None
        i, t = job.payload.decode().split()
        EVENTS.write("lat", i, time.time() - float(t))

    @pgq.entrypoint("sleeper", accepts_context=True)
    async def sleeper(job: Job, ctx: Context) -> None:
        assert job.payload is not None
        i = job.payload.decode()
        EVENTS.write("start", i, time.time())
        with ctx.cancellation:
            await asyncio.sleep(3600)
        if ctx.cancellation.cancel_called:
            EVENTS.write("cancelled", i, time.time())


def run_options(tuned: bool) -> dict[str, Any]:
    return {"batch_size": TUNED_BATCH_SIZE} if tuned else {}


async def worker_main(cfg: dict[str, Any]) -> None:
    """Hidden mode: one worker process (``--worker JSON``)."""
    start_together()
    conn = await asyncpg.connect(cfg["dsn"])
    try:
        pgq = PgQueuer(AsyncpgDriver(conn))
        register(pgq)
        mode = QueueExecutionMode.drain if cfg["drain"] else QueueExecutionMode.continuous
        await pgq.run(mode=mode, **cfg["options"])
        EVENTS.write("end", time.time())
    finally:
        await conn.close()


def workers(args: Args, options: dict[str, Any], drain: bool, count: int) -> WorkerGroup:
    cfg = json.dumps({"dsn": args.dsn, "options": options, "drain": drain})
    return WorkerGroup([[sys.executable, __file__, "--worker", cfg] for _ in range(count)])


async def enqueue_batches(queries: Queries, entrypoint: str, n: int) -> None:
    for start in range(0, n, BATCH_SIZE):
        k = min(n, start + BATCH_SIZE) - start
        await queries.enqueue([entrypoint] * k, [str(start + j).encode() for j in range(k)], [0] * k)


async def main(args: Args) -> dict[str, Any]:
    pool = await asyncpg.create_pool(args.dsn, min_size=2, max_size=4)
    try:
        async with pool.acquire() as conn:
            await Queries(AsyncpgDriver(conn)).install()
        return await run_scenario(args, Queries(AsyncpgPoolDriver(pool)), pool)
    finally:
        await pool.close()


async def run_scenario(args: Args, queries: Queries, pool: asyncpg.Pool) -> dict[str, Any]:
    if args.scenario == "enqueue_concurrent":
        return unsupported(args, VERSION, CONCURRENT_NOTE)
    result: dict[str, Any] = {"ok": True, "scenario": args.scenario, "version": VERSION}
    if args.scenario == "enqueue_single":
        t0 = time.perf_counter()
        for i in range(args.n):
            await queries.enqueue("noop", str(i).encode())
        result["metric"] = throughput(args.n, time.perf_counter() - t0)
        result["settings"] = {"api": "Queries.enqueue, one call per job"}

    elif args.scenario == "enqueue_batch":
        t0 = time.perf_counter()
        await enqueue_batches(queries, "noop", args.n)
        result["metric"] = throughput(args.n, time.perf_counter() - t0)
        result["settings"] = {"api": f"Queries.enqueue with lists, {BATCH_SIZE} jobs per call"}

    elif args.scenario == "drain":
        await enqueue_batches(queries, "noop", args.n)
        options = run_options(args.tuned)
        with workers(args, options, drain=True, count=args.processes) as group:
            group.wait(timeout_s=600)
            group.check_alive()
            start_t = first_start(group.events_dir)
            end_t = max(float(f[0]) for f in read_events(group.events_dir, "end"))
        done = await pool.fetchval("SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")
        left = await pool.fetchval("SELECT count(*) FROM pgqueuer")
        if done != args.n or left != 0:
            raise RuntimeError(f"expected {args.n} successful jobs and none left, got {done} / {left}")
        result["metric"] = throughput(args.n, end_t - start_t)
        result["settings"] = {
            "run": options or "defaults",
            "processes": args.processes,
            "durability": "durable",
        }

    elif args.scenario == "latency":
        options = run_options(args.tuned)
        with workers(args, options, drain=False, count=1) as group:
            await queries.enqueue("stamp", f"-1 {time.time()}".encode())  # warm-up
            await asyncio.to_thread(wait_for_events, group.events_dir, "lat", 1, 60)
            samples = latency_tasks(args.n)
            for i in range(samples):
                await queries.enqueue("stamp", f"{i} {time.time()}".encode())
                await asyncio.sleep(LATENCY_GAP_S)
            events = await asyncio.to_thread(wait_for_events, group.events_dir, "lat", samples + 1, 60)
        result["metric"] = percentiles_ms(float(f[1]) for f in events if f[0] != "-1")
        result["settings"] = {"run": options or "defaults"}

    elif args.scenario == "cancel":
        options = run_options(args.tuned)
        with workers(args, options, drain=False, count=1) as group:
            ids = [(await queries.enqueue("sleeper", str(i).encode()))[0] for i in range(CANCEL_TASKS)]
            await asyncio.to_thread(wait_for_events, group.events_dir, "start", CANCEL_TASKS, 60)
            samples: list[float] = []
            for i, job_id in enumerate(ids):
                t0 = time.time()
                await queries.mark_job_as_cancelled([job_id])
                seen = await asyncio.to_thread(wait_for_events, group.events_dir, "cancelled", i + 1, 30)
                samples.append(next(float(f[1]) for f in seen if f[0] == str(i)) - t0)
        result["metric"] = percentiles_ms(samples)
        result["settings"] = {"run": options or "defaults", "api": "Queries.mark_job_as_cancelled"}
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        uvloop.run(worker_main(json.loads(sys.argv[2])))
    else:
        emit(uvloop.run(main(parse_args(sys.argv[1:]))))
