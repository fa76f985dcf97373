"""Task types used by the worker tests (imported in-process, or by `jobq worker --import handlers`)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg

from jobqueue import Context, Fail, Snooze, get_settings, task

RUNS_DDL = """
CREATE TABLE IF NOT EXISTS public.test_runs (
    task_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS public.test_effects (task_id bigint NOT NULL, attempt int NOT NULL);
"""

_pools: dict[int, asyncpg.Pool] = {}
_locks: dict[int, asyncio.Lock] = {}


async def _pool() -> asyncpg.Pool:
    loop_id = id(asyncio.get_running_loop())
    async with _locks.setdefault(loop_id, asyncio.Lock()):
        if loop_id not in _pools:
            url = os.environ.get("JOBQ_DATABASE_URL") or get_settings().database_url
            _pools[loop_id] = await asyncpg.create_pool(url, min_size=1, max_size=4)
    return _pools[loop_id]


async def record_run(ctx: Context) -> None:
    """Record an execution outside the task's transaction: double runs would show up here."""
    pool = await _pool()
    await pool.execute("INSERT INTO public.test_runs (task_id, attempt, pid) VALUES ($1, $2, $3)",
                       ctx.id, ctx.attempt, os.getpid())


@task("t_record", max_retries=5)
async def t_record(ctx: Context, payload: Any) -> Any:
    await record_run(ctx)
    if payload.get("sleep"):
        await asyncio.sleep(payload["sleep"])
    return {"ran": ctx.id}


@task("t_other")
async def t_other(ctx: Context, payload: Any) -> Any:
    await record_run(ctx)
    return None


@task("t_sleep")
async def t_sleep(ctx: Context, payload: Any) -> Any:
    await record_run(ctx)
    await asyncio.sleep(payload.get("s", 5))
    return "slept"


@task("t_sync_sleep")
def t_sync_sleep(ctx: Context, payload: Any) -> Any:
    end = time.monotonic() + payload.get("s", 5)
    i = 0
    while time.monotonic() < end:
        i += 1
        ctx.progress(min(0.99, i / 1000), f"tick {i}" if i % 50 == 0 else None)
        time.sleep(0.01)
    return "slept"


@task("t_proc_sleep", isolation="process")
def t_proc_sleep(ctx: Context, payload: Any) -> Any:
    ctx.progress(0.1, "child started")
    time.sleep(payload.get("s", 5))
    return "slept"


@task("t_proc_crash", isolation="process", max_retries=0)
def t_proc_crash(ctx: Context, payload: Any) -> Any:
    import faulthandler

    faulthandler.disable()  # pytest's crash dump would only add noise to the test output
    os.kill(os.getpid(), 11)
    return None


@task("t_fail", max_retries=2, backoff_base=0.2, backoff_max=0.4)
async def t_fail(ctx: Context, payload: Any) -> Any:
    await record_run(ctx)
    raise ValueError(f"transient trouble #{ctx.attempt}")


@task("t_fail_fast", max_retries=5)
async def t_fail_fast(ctx: Context, payload: Any) -> Any:
    raise Fail("the document is unreadable")


@task("t_flaky", max_retries=3, backoff_base=0.1, backoff_max=0.2)
async def t_flaky(ctx: Context, payload: Any) -> Any:
    if ctx.attempt < 2:
        raise ConnectionError("model endpoint timed out")
    return {"attempt": ctx.attempt}


@task("t_soft", timeout=0.3, max_retries=0)
async def t_soft(ctx: Context, payload: Any) -> Any:
    await asyncio.sleep(5)


@task("t_hard", timeout=0.2, hard_timeout=0.6, max_retries=0)
def t_hard(ctx: Context, payload: Any) -> Any:
    time.sleep(2)  # ignores its cancelled flag: only the hard timeout ends the attempt


@task("t_progress")
async def t_progress(ctx: Context, payload: Any) -> Any:
    for i in range(10_000):
        ctx.progress(i / 20_000, "step" if i % 1000 == 0 else None)
    ctx.progress(0.37, "final report")
    await asyncio.sleep(payload.get("hold", 1.0))
    return None


@task("t_effect", max_retries=5)
async def t_effect(ctx: Context, payload: Any) -> Any:
    await record_run(ctx)
    await asyncio.sleep(payload.get("sleep", 0))
    async with ctx.transaction() as conn:
        await conn.execute("INSERT INTO public.test_effects (task_id, attempt) VALUES ($1, $2)", ctx.id, ctx.attempt)
        ctx.result = {"effect": True}


_snoozed: set[int] = set()


@task("t_snooze")
async def t_snooze(ctx: Context, payload: Any) -> Any:
    if ctx.id not in _snoozed:
        _snoozed.add(ctx.id)
        raise Snooze(0.3, "come back later")
    return "woke"


@task("t_capped", concurrency=10)
async def t_capped(ctx: Context, payload: Any) -> Any:
    await record_run(ctx)
    await asyncio.sleep(0.3)


@task("t_stubborn", max_retries=3, backoff_base=0.1, backoff_max=0.2)
def t_stubborn(ctx: Context, payload: Any) -> Any:
    """A sync handler that never looks at its cancel flag: sleeps, then ends as `payload["end"]` says."""
    time.sleep(payload.get("s", 1.0))
    end = payload.get("end", "return")
    if end == "raise":
        raise ValueError("stubborn handler failed")
    if end == "snooze":
        raise Snooze(30, "stubborn handler snoozed")
    return "finished"
