"""Waiting for a result, and following progress, from the code that enqueued the task.

``wait`` returns the result (or raises TaskFailed with the final status and last error); ``events``
yields each change of status, progress or message until the task is final. Both hear completions
through one LISTEN connection per process, however many callers wait.

Run: python examples/wait_for_result.py  (uses JOBQ_DATABASE_URL, or the embedded PostgreSQL)
"""

from __future__ import annotations

import asyncio

from jobqueue import AsyncClient, Context, Fail, TaskFailed, task
from jobqueue.runtime.worker import Worker


@task("resize", max_retries=0)
async def resize(ctx: Context, payload: dict[str, int]) -> dict[str, int]:
    for step in range(1, 4):
        ctx.progress(step / 4, f"tile {step} of 3")
        await asyncio.sleep(0.4)  # progress is written about 4 times a second
    if payload["width"] <= 0:
        raise Fail(f"width must be positive, got {payload['width']}")
    return {"width": payload["width"], "height": payload["width"] * 3 // 4}


async def run() -> tuple[dict[str, int], list[str], str]:
    worker = Worker(["resize"])
    running = asyncio.create_task(worker.run())  # in production the worker is another process
    try:
        async with AsyncClient() as client:
            result = await client.wait(await client.enqueue("resize", {"width": 800}), timeout=30)
            followed = await client.enqueue("resize", {"width": 640})
            lines = [f"{e.status} {e.progress:.2f} {e.message}" async for e in client.events(followed, timeout=30)]
            try:
                await client.wait(await client.enqueue("resize", {"width": 0}), timeout=30)
                failure = "no error"
            except TaskFailed as exc:
                failure = f"{exc.status}: {exc.error}"
    finally:
        worker.stop()
        await running
    return result, lines, failure


def main() -> tuple[dict[str, int], list[str], str]:
    result, lines, failure = asyncio.run(run())
    print(result, *lines, failure, sep="\n")
    return result, lines, failure


if __name__ == "__main__":
    main()
