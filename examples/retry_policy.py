"""Retry policies per type: retry only the errors worth retrying, with your own backoff.

``retry_on`` lists the exception types that are retried (a rate limit, a timeout); any other error
fails the task at once instead of spending its retries on a bug. ``backoff(n)`` is the delay in
seconds before retry n (1 for the first), used as given (no exponential growth, no jitter).

Run: python examples/retry_policy.py
"""

from __future__ import annotations

import asyncio
import time

from jobqueue import Client, Context, task
from jobqueue.runtime.worker import Worker

tries: dict[str, list[float]] = {"embed": [], "summarise": []}


class RateLimited(Exception):
    """What an embedding API's 429 becomes."""


@task("embed", retry_on=(RateLimited, TimeoutError), max_retries=3, backoff=lambda n: 0.1 * n)
def embed(ctx: Context, payload: dict[str, str]) -> str:
    tries["embed"].append(time.monotonic())
    if len(tries["embed"]) < 3:
        raise RateLimited("429 Too Many Requests")
    return f"vector of {payload['text']!r}"


@task("summarise", retry_on=RateLimited, max_retries=5)
def summarise(ctx: Context, payload: dict[str, str]) -> str:
    tries["summarise"].append(time.monotonic())
    return payload["missing"]  # a KeyError: a bug, not worth five retries


async def run() -> dict[str, tuple[str, int]]:
    client = Client()
    ids = {"embed": client.enqueue("embed", {"text": "hello"}),
           "summarise": client.enqueue("summarise", {"text": "hello"})}
    worker = Worker(["embed", "summarise"])
    runner = asyncio.create_task(worker.run())
    while any(client.get(i).status in ("queued", "running") for i in ids.values()):
        await asyncio.sleep(0.05)
    worker.stop()
    await runner
    out = {name: (client.get(i).status, len(tries[name])) for name, i in ids.items()}
    client.close()
    return out


def main() -> dict[str, tuple[str, int]]:
    result = asyncio.run(run())
    for name, (status, attempts) in result.items():
        print(f"{name}: {status} after {attempts} attempt(s)")
    return result


if __name__ == "__main__":
    main()
