"""jobq's driver for the side-by-side benchmark. Protocol: ``bench/README.md``.

Workers are ``jobq worker``'s runtime (``jobqueue.runtime.worker.Worker``) in separate processes, on uvloop
when it is installed (a dependency of jobq on Linux). Defaults: jobq's documented defaults
(concurrency 100, durable: synchronous_commit stays on for enqueues and completions). Tuned: a larger
concurrency, so each claim and each completion statement covers more tasks.
Cancellation uses ``Client.cancel`` (NOTIFY on jobq.cancel to the worker holding the task).

``enqueue_concurrent``: ``BENCH_JOBQ_GROUP_COMMIT=0`` turns group commit off (each call its own commit), to
compare at the same concurrency.

jobq only (bench/sweep.py): ``BENCH_JOBQ_CONCURRENCY`` overrides the concurrency of the drain; the
``mass_cancel`` scenario enqueues and cancels ``BENCH_MASS_CANCEL`` tasks (default 100,000), then
drains N new ones with one worker at defaults (the drain after a mass cancel, issue 12 target 8).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from _driverlib import (
    BATCH_SIZE,
    CANCEL_TASKS,
    CONCURRENT_CALLERS,
    CONCURRENT_THREADS,
    LATENCY_GAP_S,
    Args,
    EventLog,
    WorkerGroup,
    concurrent_calls,
    emit,
    first_start,
    latency_tasks,
    parse_args,
    percentiles_ms,
    read_events,
    start_together,
    threaded_calls,
    throughput,
    wait_for_events,
)

# A worker process imports only what runs its tasks: the clients, the migrations (alembic, SQLAlchemy)
# and psycopg are the parent's, imported where it uses them. They were ~1 s of each worker's start
# on this machine, all of it before the first claim, so the second process of a short two-process
# drain joined late and the first did most of the work (issue 12).
from jobqueue.registry import task
from jobqueue.runtime.worker import Worker, new_event_loop

if TYPE_CHECKING:
    from jobqueue import Client, Context

TUNED_CONCURRENCY = 500
EVENTS = EventLog()
_first = False


@task("noop", max_retries=0)
async def noop(ctx: Context, payload: Any) -> None:
    global _first
    if not _first:
        _first = True
        EVENTS.write("first", time.time())


@task("stamp")
async def stamp(ctx: Context, payload: Any) -> None:
    EVENTS.write("lat", payload["i"], time.time() - payload["t"])


@task("sleeper")
async def sleeper(ctx: Context, payload: Any) -> None:
    EVENTS.write("start", payload["i"], time.time())
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        EVENTS.write("cancelled", payload["i"], time.time())
        raise


def concurrency(tuned: bool) -> int:
    from jobqueue import get_settings

    if os.environ.get("BENCH_JOBQ_CONCURRENCY"):
        return int(os.environ["BENCH_JOBQ_CONCURRENCY"])
    return TUNED_CONCURRENCY if tuned else get_settings().concurrency


async def worker_main(cfg: dict[str, Any]) -> None:
    """Hidden mode: one worker process (``--worker JSON``)."""
    start_together()
    worker = Worker(cfg["types"], url=cfg["dsn"], burst=cfg["burst"], concurrency=cfg["concurrency"],
                    grace_seconds=0)
    await worker.run()
    EVENTS.write("end", time.time())


def workers(args: Args, types: list[str], burst: bool, count: int, conc: int) -> WorkerGroup:
    cfg = json.dumps({"dsn": args.dsn, "types": types, "burst": burst, "concurrency": conc})
    return WorkerGroup([[sys.executable, __file__, "--worker", cfg] for _ in range(count)])


def enqueue_batches(client: Client, n: int) -> None:
    for start in range(0, n, BATCH_SIZE):
        client.enqueue_many("noop", [{"i": i} for i in range(start, min(n, start + BATCH_SIZE))])


def drain(args: Args, client: Client, conc: int) -> dict[str, Any]:
    """N no-op tasks queued, then drained by burst workers: jobs/s from the first handler to the last end."""
    # The table may hold history already (bench/history.py), and the worker's pruner may delete some of it
    # meanwhile: count only this run's tasks, the ids above the highest one before it.
    before = client._own().execute("SELECT coalesce(max(id), 0) FROM jobq.tasks").fetchone()
    enqueue_batches(client, args.n)
    with workers(args, ["noop"], burst=True, count=args.processes, conc=conc) as group:
        group.wait(timeout_s=600)
        group.check_alive()
        start_t = first_start(group.events_dir)
        end_t = max(float(f[0]) for f in read_events(group.events_dir, "end"))
    done = client._own().execute("SELECT count(*) FROM jobq.tasks WHERE status = 'done' AND id > %s",
                                 (before[0] if before else 0,)).fetchone()
    if done is None or done[0] != args.n:
        raise RuntimeError(f"expected {args.n} done tasks, got {done}")
    return throughput(args.n, end_t - start_t)


async def enqueue_concurrent(args: Args, client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """N single enqueues from CONCURRENT_CALLERS coroutines on one AsyncClient, then N from
    CONCURRENT_THREADS threads on one Client; each call returns once its task is committed
    (group commit shares the commits). The metric is the coroutines' (jobs/s, call latency), with
    the threads' under ``threads``."""
    from jobqueue import AsyncClient, Client

    grouped = os.environ.get("BENCH_JOBQ_GROUP_COMMIT", "1") != "0"
    before = client._own().execute("SELECT count(*) FROM jobq.tasks").fetchone()
    async with AsyncClient(args.dsn, group_commit=grouped) as ac:
        await ac.enqueue("noop", {"i": -1})  # connect outside the clock
        metric = await concurrent_calls(lambda i: ac.enqueue("noop", {"i": i}), args.n)
        coroutines = ac.group_stats
    with Client(args.dsn, group_commit=grouped) as tc:
        metric["threads"] = await asyncio.to_thread(threaded_calls, lambda i: tc.enqueue("noop", {"i": i}), args.n)
        threads = tc.group_stats
    stored = client._own().execute("SELECT count(*) FROM jobq.tasks").fetchone()
    if stored is None or before is None or stored[0] - before[0] != 2 * args.n + 1:
        raise RuntimeError(f"expected {2 * args.n + 1} new tasks, found {stored} after {before}")
    settings: dict[str, Any] = {"api": f"AsyncClient.enqueue from {CONCURRENT_CALLERS} coroutines; Client.enqueue "
                                       f"from {CONCURRENT_THREADS} threads", "group_commit": grouped}
    for name, stats in (("coroutines", coroutines), ("threads", threads)):
        if stats is not None:
            settings[name] = {"statements": stats.statements, "calls": stats.calls, "largest": stats.largest}
    return metric, settings


async def main(args: Args) -> dict[str, Any]:
    from jobqueue import Client
    from jobqueue.admin.migrate import migrate

    migrate(args.dsn)
    client = Client(args.dsn)
    try:
        return await run_scenario(args, client)
    finally:
        client.close()


async def run_scenario(args: Args, client: Client) -> dict[str, Any]:
    from importlib.metadata import version

    from jobqueue import AsyncClient

    result: dict[str, Any] = {"ok": True, "scenario": args.scenario, "version": version("jobq")}
    conc = concurrency(args.tuned)
    if args.scenario == "enqueue_single":
        t0 = time.perf_counter()
        for i in range(args.n):
            client.enqueue("noop", {"i": i})
        result["metric"] = throughput(args.n, time.perf_counter() - t0)
        result["settings"] = {"api": "Client.enqueue, one call (one commit) per task"}

    elif args.scenario == "enqueue_batch":
        async with AsyncClient(args.dsn) as ac:
            await ac.enqueue_many("noop", [{"i": 0}])  # connect and warm up outside the clock
            t0 = time.perf_counter()
            for start in range(0, args.n, BATCH_SIZE):
                await ac.enqueue_many("noop", [{"i": i} for i in range(start, min(args.n, start + BATCH_SIZE))])
            result["metric"] = throughput(args.n, time.perf_counter() - t0)
        result["settings"] = {"api": f"AsyncClient.enqueue_many (text COPY of 6 columns), {BATCH_SIZE} tasks per call"}

    elif args.scenario == "enqueue_concurrent":
        result["metric"], result["settings"] = await enqueue_concurrent(args, client)

    elif args.scenario in ("drain", "mass_cancel"):
        if args.scenario == "mass_cancel":
            cancelled = int(os.environ.get("BENCH_MASS_CANCEL", "100000"))
            chunk = 10 * BATCH_SIZE
            for start in range(0, cancelled, chunk):
                ids = client.enqueue_many("noop", [{"i": i} for i in range(start, min(cancelled, start + chunk))])
                client.cancel(ids)
            result["settings"] = {"cancelled_first": cancelled}
        result["metric"] = drain(args, client, conc)
        result["settings"] = {**result.get("settings", {}), "worker": {"concurrency": conc},
                              "processes": args.processes, "history": "finished tasks stay in the tasks table"}

    elif args.scenario == "latency":
        with workers(args, ["stamp"], burst=False, count=1, conc=conc) as group:
            client.enqueue("stamp", {"i": -1, "t": time.time()})  # warm-up
            await asyncio.to_thread(wait_for_events, group.events_dir, "lat", 1, 60)
            samples = latency_tasks(args.n)
            for i in range(samples):
                client.enqueue("stamp", {"i": i, "t": time.time()})
                await asyncio.sleep(LATENCY_GAP_S)
            events = await asyncio.to_thread(wait_for_events, group.events_dir, "lat", samples + 1, 60)
        result["metric"] = percentiles_ms(float(f[1]) for f in events if f[0] != "-1")
        result["settings"] = {"worker": {"concurrency": conc}}

    elif args.scenario == "cancel":
        with workers(args, ["sleeper"], burst=False, count=1, conc=max(conc, CANCEL_TASKS)) as group:
            ids = client.enqueue_many("sleeper", [{"i": i} for i in range(CANCEL_TASKS)])
            await asyncio.to_thread(wait_for_events, group.events_dir, "start", CANCEL_TASKS, 60)
            samples: list[float] = []
            for i, task_id in enumerate(ids):
                t0 = time.time()
                client.cancel(task_id)
                seen = await asyncio.to_thread(wait_for_events, group.events_dir, "cancelled", i + 1, 30)
                samples.append(next(float(f[1]) for f in seen if f[0] == str(i)) - t0)
        result["metric"] = percentiles_ms(samples)
        result["settings"] = {"api": "Client.cancel (NOTIFY to the worker holding the task)"}
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        new_event_loop().run_until_complete(worker_main(json.loads(sys.argv[2])))
    else:
        emit(asyncio.run(main(parse_args(sys.argv[1:]))))
