"""The task of the control scenario (bench/control.py): runs until it is cancelled."""

from __future__ import annotations

import asyncio
from typing import Any

from jobqueue import Context, task


@task("ctl_bench", max_retries=0)
async def ctl_bench(ctx: Context, payload: Any) -> Any:
    await asyncio.sleep(3600)  # the cancel interrupts this sleep
    return None
