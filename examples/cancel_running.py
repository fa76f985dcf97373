"""Cancelling a running task: the cancel reaches the handler through NOTIFY in milliseconds.

A sync handler learns it at its next progress() call (which raises Cancelled); an async handler gets
CancelledError at its next await. Either way the task ends `cancelled`, not `failed`.

Run: python examples/cancel_running.py
"""

from __future__ import annotations

import asyncio
import time

from jobqueue import Client, Context, task
from jobqueue.runtime.worker import Worker


@task("long_parse")
def long_parse(ctx: Context, payload: dict[str, int]) -> None:
    for page in range(payload["pages"]):
        ctx.progress(page / payload["pages"], f"page {page + 1}")  # raises Cancelled once cancelled
        time.sleep(0.05)


async def run() -> tuple[str, float]:
    client = Client()
    task_id = client.enqueue("long_parse", {"pages": 1000})
    worker = Worker(["long_parse"])
    runner = asyncio.create_task(worker.run())
    while client.get(task_id).status != "running":
        await asyncio.sleep(0.02)
    started = time.monotonic()
    await asyncio.to_thread(client.cancel, task_id)
    while client.get(task_id).status != "cancelled":
        await asyncio.sleep(0.01)
    took = time.monotonic() - started
    worker.stop()
    await runner
    client.close()
    return client.get(task_id).status, took


def main() -> tuple[str, float]:
    status, took = asyncio.run(run())
    print(f"task {status} {took * 1000:.0f} ms after the cancel")
    return status, took


if __name__ == "__main__":
    main()
