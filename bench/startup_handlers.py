"""The task type `jobq worker` claims in ``python -m bench startup`` (copied next to the trees it times)."""

from __future__ import annotations

from typing import Any

from jobqueue import Context, task


@task("bench_startup_noop")
async def noop(ctx: Context, payload: Any) -> None:
    """Does nothing: the benchmark times how soon after start the worker claims it."""
