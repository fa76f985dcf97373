"""The task of the overlap scenario (bench/overlap.py): short, reports progress several times, so
heartbeats, progress flushes and completions of many running tasks overlap all the time."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from jobqueue import Context, task


@task("ov_work", max_retries=5)
async def ov_work(ctx: Context, payload: Any) -> Any:
    steps = int(payload.get("steps", 4))
    for i in range(steps):
        ctx.progress((i + 1) / (steps + 1), f"step {i + 1}")
        await asyncio.sleep(random.uniform(0.0, float(payload.get("sleep", 0.05))))
    return {"i": payload.get("i")}
