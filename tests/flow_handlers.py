"""Flow-controlled task types for tests/test_flow.py and bench/flow.py's worker processes
(`jobq worker --import flow_handlers`)."""

from __future__ import annotations

import asyncio
from typing import Any

from jobqueue import Context, task


async def _nap(payload: Any) -> str:
    await asyncio.sleep(float(payload.get("s", 0.0)))
    return "ok"


@task("f_fair", fair_by="owner")
async def f_fair(ctx: Context, payload: Any) -> Any:
    return await _nap(payload)


@task("f_tenant", fair_by="payload.tenant")
async def f_tenant(ctx: Context, payload: Any) -> Any:
    return await _nap(payload)


@task("f_limited", limit_by="owner", limit=2)
async def f_limited(ctx: Context, payload: Any) -> Any:
    return await _nap(payload)


@task("f_fair_limited", fair_by="owner", limit_by="owner", limit=3)
async def f_fair_limited(ctx: Context, payload: Any) -> Any:
    return await _nap(payload)


@task("f_rate", rate="3/m")
async def f_rate(ctx: Context, payload: Any) -> Any:
    return await _nap(payload)


@task("f_rate_by", rate="2/m", rate_by="owner")
async def f_rate_by(ctx: Context, payload: Any) -> Any:
    return await _nap(payload)


@task("f_plain")
async def f_plain(ctx: Context, payload: Any) -> Any:
    return await _nap(payload)
