"""Shared helpers for peer drivers (stdlib only; imported by every ``*_driver.py``).

A driver runs inside its peer's own virtualenv, so this module must not import
anything outside the standard library. See ``bench/README.md`` for the protocol.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCENARIOS = ("enqueue_single", "enqueue_batch", "enqueue_concurrent", "drain", "latency", "cancel", "mass_cancel")
BATCH_SIZE = 1000  # jobs per call of a peer's batch-enqueue API
CONCURRENT_CALLERS = 64  # coroutines each awaiting one single enqueue at a time (enqueue_concurrent)
CONCURRENT_THREADS = 16  # threads each making one single enqueue at a time (enqueue_concurrent)
CONCURRENT_NOTE = ("not driven for this peer yet (issue 12 added the scenario for jobq's group commit); its "
                   "single enqueue from concurrent callers is one commit per call")
LATENCY_GAP_S = 0.020  # gap between two enqueues in the latency scenario
LATENCY_TASKS = 200  # samples in the latency scenario, at least: see latency_tasks()
CANCEL_TASKS = 100
EVENTS_ENV = "BENCH_EVENTS_DIR"
GROUP_SIZE_ENV = "BENCH_GROUP_SIZE"


@dataclass(frozen=True)
class Args:
    """The five positional arguments of the driver protocol."""

    scenario: str
    n: int
    processes: int
    tuned: bool
    dsn: str


def parse_args(argv: Sequence[str]) -> Args:
    if len(argv) != 5:
        raise SystemExit("usage: <driver> SCENARIO N PROCESSES TUNED(0|1) DSN")
    scenario, n, processes, tuned, dsn = argv
    if scenario not in SCENARIOS:
        raise SystemExit(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    return Args(scenario, int(n), int(processes), tuned == "1", dsn)


def emit(result: dict[str, Any]) -> None:
    """Print the single JSON result line that the orchestrator reads."""
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()


def unsupported(args: Args, version: str, note: str) -> dict[str, Any]:
    return {"ok": False, "unsupported": True, "scenario": args.scenario, "version": version, "note": note}


def percentiles_ms(samples_s: Iterable[float]) -> dict[str, float]:
    """p50/p95/p99 (nearest-rank) of samples in seconds, returned in milliseconds."""
    data = sorted(samples_s)
    if not data:
        return {}

    def rank(p: float) -> float:
        return data[max(0, math.ceil(p / 100 * len(data)) - 1)] * 1000

    return {
        "p50_ms": round(rank(50), 3),
        "p95_ms": round(rank(95), 3),
        "p99_ms": round(rank(99), 3),
        "mean_ms": round(statistics.fmean(data) * 1000, 3),
        "max_ms": round(data[-1] * 1000, 3),
        "samples": len(data),
        # every sample, for the latency CDF of bench/plots.py
        "raw_ms": [round(x * 1000, 3) for x in data],
    }


def latency_tasks(n: int) -> int:
    """Samples in the latency scenario: a twentieth of the run's N (1,000 in the full profile), at least
    LATENCY_TASKS. With 200, p99 was the second-highest sample and moved by a millisecond between runs."""
    return max(LATENCY_TASKS, n // 20)


def throughput(n: int, elapsed_s: float) -> dict[str, float]:
    return {"n": n, "elapsed_s": round(elapsed_s, 4), "jobs_per_s": round(n / elapsed_s, 1)}


def _calls(n: int) -> Iterator[int]:
    """The job indexes callers take turns at (one shared iterator: each index is taken once)."""
    return iter(range(n))


async def concurrent_calls(call: Callable[[int], Awaitable[Any]], n: int,
                           callers: int = CONCURRENT_CALLERS) -> dict[str, Any]:
    """`callers` coroutines, each awaiting `call(i)` for the next job until N are done: jobs/s over
    the whole run and the percentiles of one call's wall time (the web server that enqueues per request)."""
    import asyncio

    todo = _calls(n)
    samples: list[float] = []

    async def caller() -> None:
        for i in todo:
            t0 = time.perf_counter()
            await call(i)
            samples.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return {**throughput(n, time.perf_counter() - t0), **percentiles_ms(samples)}


def threaded_calls(call: Callable[[int], Any], n: int, threads: int = CONCURRENT_THREADS) -> dict[str, Any]:
    """As :func:`concurrent_calls` with `threads` threads making blocking calls."""
    import threading

    todo = _calls(n)
    samples: list[float] = []
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            for i in todo:
                t0 = time.perf_counter()
                call(i)
                samples.append(time.perf_counter() - t0)
        except BaseException as exc:  # re-raised in the driver's thread
            errors.append(exc)

    pool = [threading.Thread(target=caller) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {**throughput(n, elapsed), **percentiles_ms(samples)}


# --- events written by handlers running in worker processes ------------------------


class EventLog:
    """Append-only per-process event file, read back by the driver.

    Handlers call :meth:`write` with whitespace-separated fields; each line is one
    ``os.write`` on an ``O_APPEND`` descriptor, so concurrent writers never interleave.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or os.environ.get(EVENTS_ENV, "")
        self._fd: int | None = None
        self._pid = 0

    def write(self, *fields: object) -> None:
        if not self.directory:
            return
        if self._fd is None or self._pid != os.getpid():  # reopen after fork
            self._pid = os.getpid()
            path = os.path.join(self.directory, f"{self._pid}.events")
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._fd, (" ".join(str(f) for f in fields) + "\n").encode())


def read_events(directory: str, kind: str) -> list[list[str]]:
    """All events of ``kind`` (first field) from every process, as field lists."""
    out: list[list[str]] = []
    for path in Path(directory).glob("*.events"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == kind:
                out.append(fields[1:])
    return out


def wait_for_events(directory: str, kind: str, count: int, timeout_s: float, poll_s: float = 0.002) -> list[list[str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        events = read_events(directory, kind)
        if len(events) >= count:
            return events
        if time.monotonic() > deadline:
            raise TimeoutError(f"saw {len(events)}/{count} {kind!r} events after {timeout_s}s")
        time.sleep(poll_s)


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float) -> float:
    """Poll ``predicate`` until it is true; return the ``time.time()`` it was seen true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        time.sleep(poll_s)
    return time.time()


# --- worker processes ----------------------------------------------------------------


@dataclass
class WorkerGroup:
    """Worker subprocesses sharing one event directory; a context manager."""

    commands: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    events_dir: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> WorkerGroup:
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-events-")
        self.events_dir = self._tmp.name
        env = {**os.environ, **self.env, EVENTS_ENV: self.events_dir, GROUP_SIZE_ENV: str(len(self.commands))}
        for cmd in self.commands:
            self.procs.append(subprocess.Popen(cmd, env=env, cwd=self.cwd, stdout=subprocess.DEVNULL))
        return self

    def check_alive(self) -> None:
        dead = [p.args for p in self.procs if p.poll() is not None and p.returncode != 0]
        if dead:
            raise RuntimeError(f"worker exited with an error: {dead}")

    def wait(self, timeout_s: float) -> None:
        for p in self.procs:
            p.wait(timeout=timeout_s)

    def __exit__(self, *_: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._tmp is not None:
            self._tmp.cleanup()


def start_together(timeout_s: float = 120) -> None:
    """Called by every worker process of a group once it has imported its code, before it takes a job:
    returns when all of them have. A drain is timed from the first handler to the last, and a Python
    process takes 0.3-1 s to start; without this the first process of a short two-process drain did
    most of it before the second joined, which timed one process plus a start (issue 12)."""
    directory = os.environ.get(EVENTS_ENV, "")
    size = int(os.environ.get(GROUP_SIZE_ENV) or 1)
    if directory and size > 1:
        EventLog(directory).write("ready", os.getpid())
        wait_for_events(directory, "ready", size, timeout_s)


def first_start(events_dir: str) -> float:
    """Earliest ``first`` stamp: the moment the first worker began its first job."""
    stamps = [float(f[0]) for f in read_events(events_dir, "first")]
    if not stamps:
        raise RuntimeError("no worker recorded a first job")
    return min(stamps)
