"""The task types `jobq worker` runs in ``python -m bench.flow`` (imported with --import bench.flow_handlers)."""

from __future__ import annotations

import asyncio
from typing import Any

from jobqueue import Context, task


async def _nap(payload: Any) -> None:
    await asyncio.sleep(float(payload.get("s", 0.0)))


@task("bf_fair", fair_by="owner")
async def bf_fair(ctx: Context, payload: Any) -> None:
    """A tenant's task: fair claims take turns across owners."""
    await _nap(payload)


@task("bf_rate", rate="50/s")
async def bf_rate(ctx: Context, payload: Any) -> None:
    """A call to a rate-limited API: at most 50 started per second across the cluster."""
    await _nap(payload)


@task("bf_limit", limit_by="owner", limit=3)
async def bf_limit(ctx: Context, payload: Any) -> None:
    """At most 3 running per owner, whatever dies."""
    await _nap(payload)


@task("bf_plain")
async def bf_plain(ctx: Context, payload: Any) -> None:
    """No flow control: the plain claim."""
    await _nap(payload)
