"""Celery (Redis broker) peer driver: the RAGFlow/Celery-style baseline. Protocol: ``bench/README.md``.

The DSN argument is ignored (Celery keeps jobs in Redis); the broker is
``$BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``), flushed before each run.
Defaults: ``celery worker --concurrency P`` (prefork pool, prefetch multiplier 4, no
result backend). Tuned, per Celery's "Optimizing" guide for many short tasks: P
separate ``--pool solo`` worker processes with a high ``--prefetch-multiplier`` and
gossip/mingle/heartbeat off. Cancellation uses ``control.revoke(id, terminate=True, signal="SIGUSR1")``: the
prefork pool process running the job gets SIGUSR1, which Celery turns into
``SoftTimeLimitExceeded`` inside the handler. Only the prefork pool can terminate a
running job, so this scenario always uses the default worker, and the 100 jobs run
one after another (one prefork process) rather than all at once.
"""

from __future__ import annotations

import os
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis
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
    start_together,
    throughput,
    unsupported,
    wait_for_events,
    wait_until,
)
from celery import Celery, group
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_ready

VERSION = version("celery")
BROKER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
QUEUE = "celery"
TUNED_PREFETCH = 64
EVENTS = EventLog()
_seen_first = False

app = Celery("bench", broker=BROKER)


@worker_ready.connect
def _start_together(**_: Any) -> None:
    """The tuned workers (one solo process each) take no job until all of them are up."""
    start_together()


@app.task(name="noop")
def noop(i: int) -> None:
    global _seen_first
    if not _seen_first:
        _seen_first = True
        EVENTS.write("first", time.time())


@app.task(name="stamp")
def stamp(i: int, t: float) -> None:
    EVENTS.write("lat", i, time.time() - t)


@app.task(name="sleeper")
def sleeper(i: int) -> None:
    EVENTS.write("start", i, time.time())
    try:
        time.sleep(3600)
    except SoftTimeLimitExceeded:
        EVENTS.write("cancelled", i, time.time())


def worker_commands(processes: int, tuned: bool) -> tuple[list[list[str]], dict[str, Any]]:
    base = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_driver",
        "worker",
        "--loglevel",
        "WARNING",
        "-Q",
        QUEUE,
    ]
    if not tuned:
        return [[*base, "-n", "w0@%h", "--concurrency", str(processes)]], {
            "pool": "prefork",
            "concurrency": processes,
        }
    tuned_flags = ["--pool", "solo", "--prefetch-multiplier", str(TUNED_PREFETCH)]
    tuned_flags += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    commands = [[*base, "-n", f"w{k}@%h", *tuned_flags] for k in range(processes)]
    return commands, {"pool": "solo", "worker_processes": processes, "prefetch_multiplier": TUNED_PREFETCH}


def workers(commands: list[list[str]]) -> WorkerGroup:
    return WorkerGroup(commands, env={"BENCH_REDIS_URL": BROKER}, cwd=str(Path(__file__).parent))


def enqueue_batches(n: int) -> None:
    for start in range(0, n, BATCH_SIZE):
        group(noop.s(i) for i in range(start, min(n, start + BATCH_SIZE))).apply_async()


def main(args: Args) -> dict[str, Any]:
    r = redis.Redis.from_url(BROKER)
    r.flushdb()
    info = r.info("server")
    persistence = {
        "appendonly": r.config_get("appendonly").get("appendonly"),
        "save": r.config_get("save").get("save"),
    }
    server = {"redis_version": info.get("redis_version"), "redis_persistence": persistence}
    if args.scenario == "enqueue_concurrent":
        return unsupported(args, VERSION, CONCURRENT_NOTE)
    result: dict[str, Any] = {"ok": True, "scenario": args.scenario, "version": VERSION, "server": server}

    if args.scenario == "enqueue_single":
        t0 = time.perf_counter()
        for i in range(args.n):
            noop.delay(i)
        result["metric"] = throughput(args.n, time.perf_counter() - t0)
        result["settings"] = {"api": "Task.delay, one call per job"}

    elif args.scenario == "enqueue_batch":
        t0 = time.perf_counter()
        enqueue_batches(args.n)
        result["metric"] = throughput(args.n, time.perf_counter() - t0)
        result["settings"] = {"api": f"group(...).apply_async(), {BATCH_SIZE} jobs per call"}

    elif args.scenario == "drain":
        enqueue_batches(args.n)
        commands, settings = worker_commands(args.processes, args.tuned)
        with workers(commands) as group_:

            def drained() -> bool:
                group_.check_alive()
                return r.llen(QUEUE) == 0 and r.hlen("unacked") == 0

            # Early ack (Celery's default) removes a message from "unacked" as its
            # handler starts, so this sees the moment the last no-op job began.
            end_t = wait_until(drained, timeout_s=600, poll_s=0.005)
            start_t = first_start(group_.events_dir)
        result["metric"] = throughput(args.n, end_t - start_t)
        result["settings"] = {"worker": settings}

    elif args.scenario == "latency":
        commands, settings = worker_commands(1, args.tuned)
        with workers(commands) as group_:
            stamp.delay(-1, time.time())  # warm-up: the worker is consuming
            wait_for_events(group_.events_dir, "lat", 1, 60)
            samples = latency_tasks(args.n)
            for i in range(samples):
                stamp.delay(i, time.time())
                time.sleep(LATENCY_GAP_S)
            events = wait_for_events(group_.events_dir, "lat", samples + 1, 60)
        result["metric"] = percentiles_ms(float(f[1]) for f in events if f[0] != "-1")
        result["settings"] = {"worker": settings}

    else:  # cancel
        commands, settings = worker_commands(1, tuned=False)
        with workers(commands) as group_:
            samples: list[float] = []
            for i in range(CANCEL_TASKS):
                job = sleeper.delay(i)
                wait_for_events(group_.events_dir, "start", i + 1, 60)
                t0 = time.time()
                app.control.revoke(job.id, terminate=True, signal="SIGUSR1")
                seen = wait_for_events(group_.events_dir, "cancelled", i + 1, 30)
                samples.append(next(float(f[1]) for f in seen if f[0] == str(i)) - t0)
        result["metric"] = percentiles_ms(samples)
        result["settings"] = {
            "worker": settings,
            "api": 'control.revoke(terminate=True, signal="SIGUSR1")',
            "mode": "one running job at a time",
        }
    return result


if __name__ == "__main__":
    emit(main(parse_args(sys.argv[1:])))
