"""Callbacks on the parents' outcome: a task that runs when its parents finish, whatever the outcome
(run_on="always"), or only when one of them failed (run_on="failure"), like a batch callback in Oban
Pro or a chord's error callback in Celery. It reads how each parent ended with ``await ctx.parents()``,
so it can mark a document failed or clean up after it.

Run: python examples/callbacks.py
"""

from __future__ import annotations

import asyncio

from jobqueue import Client, Context, Fail, task
from jobqueue.runtime.worker import Worker

report: dict[str, str] = {}


@task("parse_range", max_retries=0)
def parse_range(ctx: Context, payload: dict[str, int]) -> dict[str, int]:
    if payload["from_page"] == 20:
        raise Fail("page 23 is encrypted")
    return {"pages": payload["to_page"] - payload["from_page"]}


@task("finish_document")
async def finish_document(ctx: Context, payload: dict[str, str]) -> None:
    parents = await ctx.parents()
    failed = [f"task {p.id}: {p.error}" for p in parents if p.status != "done"]
    pages = sum(p.result["pages"] for p in parents if p.status == "done")
    report[payload["when"]] = f"{pages} pages parsed; failed: {'; '.join(failed) or 'none'}"


async def run() -> dict[str, str]:
    client = Client()
    ranges = [client.enqueue("parse_range", {"from_page": p, "to_page": p + 10}) for p in (0, 10, 20)]
    always = client.enqueue("finish_document", {"when": "always"}, depends_on=ranges, run_on="always")
    on_failure = client.enqueue("finish_document", {"when": "failure"}, depends_on=ranges, run_on="failure")
    on_success = client.enqueue("finish_document", {"when": "success"}, depends_on=ranges)  # the default
    worker = Worker(["parse_range", "finish_document"], burst=True)
    await worker.run()
    statuses = {name: client.get(i).status for name, i in
                (("always", always), ("failure", on_failure), ("success", on_success))}
    client.close()
    print(statuses)
    return report


def main() -> dict[str, str]:
    done = asyncio.run(run())
    for when, line in sorted(done.items()):
        print(f"run_on={when}: {line}")
    return done


if __name__ == "__main__":
    main()
