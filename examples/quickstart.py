"""Quickstart: register a task type, enqueue a few tasks, run a worker until the queue is empty.

Run: python examples/quickstart.py  (uses JOBQ_DATABASE_URL, or the embedded PostgreSQL)
"""

from __future__ import annotations

import asyncio

from jobqueue import Client, Context, task
from jobqueue.runtime.worker import Worker


@task("greet", max_retries=2)
async def greet(ctx: Context, payload: dict[str, str]) -> dict[str, str]:
    ctx.progress(0.5, f"greeting {payload['name']}")
    return {"greeting": f"hello, {payload['name']}"}


def main() -> list[str]:
    with Client() as client:
        ids = [client.enqueue("greet", {"name": name}, priority=p) for p, name in enumerate(["ada", "grace", "linus"])]
        asyncio.run(Worker(["greet"], burst=True).run())  # --burst: work until nothing is runnable
        results = [client.get(i).result["greeting"] for i in ids]
    for line in results:
        print(line)
    return results


if __name__ == "__main__":
    main()
