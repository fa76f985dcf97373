"""Queue control: pause and cap a queue, cancel and reprioritise by selector, and snooze on HTTP 429.

A tenant's backlog is paused while the operator looks at it, capped to 2 running at a time, one
tenant's work is cancelled in one statement, an urgent document jumps the queue, and a handler
whose API answers 429 waits for the server's Retry-After without spending a retry.

Run: python examples/queue_control.py
"""

from __future__ import annotations

import asyncio
from typing import Any

from jobqueue import Client, Context, raise_for_backpressure, task
from jobqueue.runtime.worker import Worker

CALLS: dict[int, int] = {}
ORDER: list[str] = []


def call_embedding_api(task_id: int) -> tuple[int, dict[str, str]]:
    """Stands in for an HTTP call: the first call of each task is rate limited."""
    CALLS[task_id] = CALLS.get(task_id, 0) + 1
    return (429, {"Retry-After": "1"}) if CALLS[task_id] == 1 else (200, {})


@task("embed_page")
async def embed_page(ctx: Context, payload: dict[str, Any]) -> None:
    status, headers = call_embedding_api(ctx.id)
    raise_for_backpressure(status, headers)  # 429: snoozed for Retry-After, retry_count unchanged
    ORDER.append(payload["name"])


async def run() -> dict[str, Any]:
    client = Client()
    client.pause("embed_page")  # nothing of this type is claimed until resume
    client.cap("embed_page", 2)  # at most 2 running across all workers
    for name in ("a1", "a2", "a3"):
        client.enqueue("embed_page", {"name": name}, owner="tenant-a")
    for name in ("b1", "b2"):
        client.enqueue("embed_page", {"name": name}, owner="tenant-b")
    urgent = client.enqueue("embed_page", {"name": "urgent"}, owner="tenant-a", labels=["urgent"])
    cancelled = client.cancel_where(owner="tenant-b")  # one statement, every live task of tenant-b
    client.prioritize(label="urgent", priority=10)  # claimed first once the queue resumes
    [queue] = [q for q in client.queues() if q.type == "embed_page"]
    worker = Worker(["embed_page"], concurrency=1, poll_seconds=0.2)
    runner = asyncio.create_task(worker.run())
    client.resume("embed_page")
    while any(t.status != "done" for t in client.list(owner="tenant-a")):
        await asyncio.sleep(0.05)
    worker.stop()
    await runner
    retries = {t.retry_count for t in client.list(owner="tenant-a")}
    client.uncap("embed_page")
    client.close()
    return {"paused_with": queue.queued, "cancelled": len(cancelled), "first": ORDER[0], "done": len(ORDER),
            "retries_spent": sum(retries), "urgent": urgent}


def main() -> dict[str, Any]:
    result = asyncio.run(run())
    print(f"{result['cancelled']} task(s) of tenant-b cancelled; {result['first']} ran first; "
          f"{result['done']} done after a 429 each, {result['retries_spent']} retries spent")
    return result


if __name__ == "__main__":
    main()
