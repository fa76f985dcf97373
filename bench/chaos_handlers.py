"""Task types of the chaos run (`python -m bench.chaos`), imported by its worker processes.

Every handler first records its execution in ``chaos_runs`` *outside* the task's transaction, so an
attempt that a kill -9 cut short still leaves a trace (that is how double execution would show up).
The async types then write their "effect" row through ``ctx.transaction()``: the effect commits
with the task's ``done`` row or not at all, so the final SQL check can demand exactly one effect per
done task and none for any other task. The sync type runs in the worker's thread pool (no
transactional completion there) and the failing type ends ``failed`` on purpose, so the run covers
every terminal state a user can see.

Handler connections go to ``JOBQ_DATABASE_URL``, which in the chaos run is PgBouncer in transaction
mode: prepared statements are therefore off (asyncpg ``statement_cache_size=0``, psycopg
``prepare_threshold=None``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import asyncpg
import psycopg

from jobqueue import Context, task

DDL = """
CREATE TABLE IF NOT EXISTS public.chaos_runs (
    task_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS public.chaos_effects (
    task_id bigint NOT NULL, attempt int NOT NULL, at timestamptz NOT NULL DEFAULT now());
"""

# Retries are generous: a task may meet several kills and a server restart and must still finish
# `done`; running out of retries would be a visible (failed) state, but not the one we test for.
RETRIES = 25
BACKOFF_BASE, BACKOFF_MAX = 0.2, 2.0

_pools: dict[int, asyncpg.Pool] = {}
_locks: dict[int, asyncio.Lock] = {}
_local = threading.local()


def _url() -> str:
    url = os.environ.get("JOBQ_DATABASE_URL")
    if not url:
        raise RuntimeError("JOBQ_DATABASE_URL must be set for the chaos handlers")
    return url


async def _pool() -> asyncpg.Pool:
    loop_id = id(asyncio.get_running_loop())
    async with _locks.setdefault(loop_id, asyncio.Lock()):
        if loop_id not in _pools:
            _pools[loop_id] = await asyncpg.create_pool(_url(), min_size=1, max_size=4, statement_cache_size=0)
    return _pools[loop_id]


async def record_run(ctx: Context) -> None:
    pool = await _pool()
    await pool.execute(
        "INSERT INTO public.chaos_runs (task_id, attempt, pid) VALUES ($1, $2, $3)", ctx.id, ctx.attempt, os.getpid()
    )


def record_run_sync(ctx: Context) -> None:
    conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        conn = psycopg.connect(_url(), autocommit=True, prepare_threshold=None, connect_timeout=5)
        _local.conn = conn
    try:
        conn.execute(
            "INSERT INTO public.chaos_runs (task_id, attempt, pid) VALUES (%s, %s, %s)",
            (ctx.id, ctx.attempt, os.getpid()),
        )
    except psycopg.Error:
        conn.close()  # reconnect on the next attempt; this one fails and is retried
        raise


async def _effect(ctx: Context) -> None:
    async with ctx.transaction() as conn:
        await conn.execute("INSERT INTO public.chaos_effects (task_id, attempt) VALUES ($1, $2)", ctx.id, ctx.attempt)
        ctx.result = {"effect": ctx.attempt}


@task("chaos_quick", max_retries=RETRIES, backoff_base=BACKOFF_BASE, backoff_max=BACKOFF_MAX)
async def chaos_quick(ctx: Context, payload: Any) -> None:
    await record_run(ctx)
    await asyncio.sleep(payload.get("s", 0.1))
    await _effect(ctx)


@task("chaos_slow", max_retries=RETRIES, backoff_base=BACKOFF_BASE, backoff_max=BACKOFF_MAX)
async def chaos_slow(ctx: Context, payload: Any) -> None:
    await record_run(ctx)
    steps = 4
    for i in range(steps):
        ctx.progress((i + 1) / (steps + 1), "halfway" if i == steps // 2 else None)
        await asyncio.sleep(payload.get("s", 1.0) / steps)
    await _effect(ctx)


@task("chaos_sync", max_retries=RETRIES, backoff_base=BACKOFF_BASE, backoff_max=BACKOFF_MAX)
def chaos_sync(ctx: Context, payload: Any) -> dict[str, int]:
    record_run_sync(ctx)
    end = time.monotonic() + payload.get("s", 0.2)
    while time.monotonic() < end:
        ctx.progress(0.5)  # raises Cancelled once the task was cancelled or lost
        time.sleep(0.02)
    return {"attempt": ctx.attempt}


@task("chaos_fail", max_retries=2, backoff_base=BACKOFF_BASE, backoff_max=BACKOFF_MAX)
async def chaos_fail(ctx: Context, payload: Any) -> None:
    await record_run(ctx)
    raise ValueError(f"chaos_fail always fails (attempt {ctx.attempt})")


TYPES = ("chaos_quick", "chaos_slow", "chaos_sync", "chaos_fail")
EFFECT_TYPES = ("chaos_quick", "chaos_slow")
