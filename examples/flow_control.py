"""Flow control: one tenant's big upload does not starve another's one document, per-tenant limits,
and a cluster-wide rate limit for a rate-limited API, all enforced by the claim (issue 14).

`fair_by="owner"` claims round-robin across owners within each priority (a tenant with nothing
running goes first), `limit_by="owner", limit=2` keeps at most 2 of a tenant's tasks running across
every worker, `rate="600/m"` starts at most 600 tasks in any minute across the cluster. The
`flow_control` view (and `jobq top`) shows each tenant's running tasks and what a limit or a rate
holds back.

Run: python examples/flow_control.py
"""

from __future__ import annotations

import asyncio

import psycopg

from jobqueue import Client, Context, TaskSpec, get_settings, task
from jobqueue.runtime.worker import Worker


@task("embed_chunks", fair_by="owner", limit_by="owner", limit=2, rate="600/m")
async def embed_chunks(ctx: Context, payload: dict[str, int]) -> None:
    await asyncio.sleep(0.02)  # the call to the embedding API


def main() -> list[str]:
    client = Client()
    client.enqueue_many("embed_chunks", [TaskSpec(payload={"page": p}, owner="big-tenant") for p in range(20)])
    client.enqueue_many("embed_chunks", [TaskSpec(payload={"page": p}, owner="small-tenant") for p in range(2)])
    asyncio.run(Worker(["embed_chunks"], concurrency=4, burst=True).run())
    settings = get_settings()
    with psycopg.connect(client.url) as conn:
        order = [r[0] for r in conn.execute(
            f'SELECT owner FROM "{settings.schema_name}".tasks WHERE type = %s ORDER BY started_at, id',
            ("embed_chunks",))]
    client.close()
    print("start order:", " ".join("S" if o == "small-tenant" else "b" for o in order))
    return order


if __name__ == "__main__":
    main()
