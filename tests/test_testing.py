"""jobqueue.testing, the pytest plugin users get: isolated databases, drain(), eager mode.

These tests use the plugin's fixtures the way a user's tests do (jobq_url, jobq_client, jobq_eager);
conftest.py points the plugin at the suite's server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import jobqueue
from jobqueue import AsyncClient, Client, Context, Fail, task
from jobqueue.testing import drain, drain_async, eager


@task("tt_add")
async def tt_add(ctx: Context, payload: dict[str, int]) -> int:
    return payload["a"] + payload["b"]


@task("tt_sync", max_retries=0)
def tt_sync(ctx: Context, payload: dict[str, Any]) -> str:
    if payload.get("fail"):
        raise Fail("asked to fail")
    return "ran"


def test_each_test_gets_a_fresh_migrated_database(jobq_client: Client, jobq_url: str) -> None:
    """Run twice (parametrised below): the second run would see the first run's task if they shared one."""
    assert jobq_client.list() == []
    jobq_client.enqueue("tt_add", {"a": 1, "b": 2})
    with psycopg.connect(jobq_url) as conn:  # unqualified names, as a user's test SQL writes them
        assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (1,)


test_each_test_gets_a_fresh_migrated_database_again = test_each_test_gets_a_fresh_migrated_database


def test_the_default_client_follows_the_test_database(jobq_url: str) -> None:
    tid = jobqueue.enqueue("tt_add", {"a": 2, "b": 2})
    assert jobqueue.get(tid).type == "tt_add" and Client().url == jobq_url


def test_drain_runs_everything_runnable(jobq_client: Client) -> None:
    parent = jobq_client.enqueue("tt_add", {"a": 1, "b": 1})
    child = jobq_client.enqueue("tt_sync", {}, depends_on=[parent])
    later = jobq_client.enqueue("tt_sync", {}, delay=3600)
    failing = jobq_client.enqueue("tt_sync", {"fail": True})
    stats = drain()
    assert jobq_client.get(parent).result == 2 and jobq_client.get(child).result == "ran"
    assert jobq_client.get(failing).status == "failed" and jobq_client.get(later).status == "queued"
    assert stats.done == 2 and stats.failed == 1


def test_drain_only_the_given_types(jobq_client: Client) -> None:
    a, s = jobq_client.enqueue("tt_add", {"a": 1, "b": 1}), jobq_client.enqueue("tt_sync", {})
    drain(["tt_sync"])
    assert jobq_client.get(a).status == "queued" and jobq_client.get(s).status == "done"


def test_eager_runs_at_enqueue(jobq_client: Client, jobq_eager: None) -> None:
    tid = jobq_client.enqueue("tt_add", {"a": 20, "b": 22})
    assert jobq_client.get(tid).result == 42
    ids = jobq_client.enqueue_many("tt_add", [{"a": i, "b": i} for i in range(3)])
    assert [jobq_client.get(i).result for i in ids] == [0, 2, 4]


def test_eager_in_async_code_and_its_end(jobq_url: str) -> None:
    async def go() -> tuple[Any, str]:
        async with AsyncClient(jobq_url) as c:
            with eager():
                done = (await c.get(await c.enqueue("tt_add", {"a": 1, "b": 2}))).result
            after = (await c.get(await c.enqueue("tt_add", {"a": 1, "b": 2}))).status
            await drain_async()
            return done, after

    assert asyncio.run(go()) == (3, "queued")


def test_a_sync_drain_inside_a_running_loop(jobq_client: Client) -> None:
    tid = jobq_client.enqueue("tt_add", {"a": 1, "b": 1})

    async def go() -> None:
        drain(["tt_add"])  # a sync helper called from async code: runs in a thread of its own

    asyncio.run(go())
    assert jobq_client.get(tid).result == 2


@pytest.mark.parametrize("n", [1, 2])
def test_wait_works_against_a_test_database(jobq_client: Client, n: int) -> None:
    tid = jobq_client.enqueue("tt_add", {"a": n, "b": n})
    drain()
    assert jobq_client.wait(tid, timeout=5) == 2 * n
