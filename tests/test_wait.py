"""Waiting for results and following progress (Client.wait / events, AsyncClient twins), on a real worker.

Also the completer's NOTIFY a waiter hears, the one shared listener, the polling fallback, and
producers that enqueue types they have not registered (declare()).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel
from support import BackgroundWorker, channel, create_database, drop_database, status, wait_for

from jobqueue import (
    AsyncClient,
    Client,
    Context,
    Fail,
    InvalidPayload,
    Status,
    TaskEvent,
    TaskFailed,
    TaskNotFound,
    WaitTimeout,
    declare,
    task,
)
from jobqueue.client import wait as waits
from jobqueue.registry import unregister
from jobqueue.settings import get_settings

gate = threading.Event()


@task("wt_ok", max_retries=0)
async def wt_ok(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    ctx.progress(0.5, "half way")
    await asyncio.sleep(0.05)
    return {"doubled": payload["n"] * 2}


@task("wt_fail", max_retries=0)
async def wt_fail(ctx: Context, payload: Any) -> None:
    raise Fail("the scanner is on fire")


@task("wt_gated", max_retries=0)
def wt_gated(ctx: Context, payload: Any) -> str:
    gate.wait(20)
    return "opened"


@pytest.fixture
def worker(db_url: str) -> Iterator[BackgroundWorker]:
    with BackgroundWorker(["wt_ok", "wt_fail", "wt_gated"], concurrency=8, poll_seconds=5) as w:
        yield w


def test_wait_returns_the_result(client: Client, worker: BackgroundWorker) -> None:
    tid = client.enqueue("wt_ok", {"n": 21})
    assert client.wait(tid, timeout=20) == {"doubled": 42}


def test_wait_raises_with_the_final_status_and_error(client: Client, worker: BackgroundWorker) -> None:
    tid = client.enqueue("wt_fail", {})
    with pytest.raises(TaskFailed) as info:
        client.wait(tid, timeout=20)
    assert info.value.task_id == tid and info.value.status == "failed"
    assert info.value.error is not None and "on fire" in info.value.error


def test_wait_on_a_cancelled_task(client: Client) -> None:
    tid = client.enqueue("wt_ok", {"n": 1}, delay=3600)
    client.cancel(tid)
    with pytest.raises(TaskFailed, match="cancelled") as info:
        client.wait(tid, timeout=5)
    assert info.value.status == "cancelled"


def test_wait_times_out_and_leaves_the_task(client: Client, conn: psycopg.Connection[Any]) -> None:
    tid = client.enqueue("wt_ok", {"n": 1}, delay=3600)
    with pytest.raises(WaitTimeout, match=f"task {tid}"):
        client.wait(tid, timeout=0.3)
    assert isinstance(WaitTimeout("x"), TimeoutError)
    assert status(conn, tid) == "queued"


def test_wait_for_an_unknown_task(client: Client) -> None:
    with pytest.raises(TaskNotFound, match="999999999"):
        client.wait(999_999_999, timeout=1)
    with pytest.raises(InvalidPayload):
        client.wait("7", timeout=1)  # type: ignore[arg-type]


def test_events_follow_progress_to_the_end(client: Client, worker: BackgroundWorker) -> None:
    gate.clear()
    tid = client.enqueue("wt_gated", {})
    seen: list[TaskEvent] = []
    for event in client.events(tid, timeout=20):
        seen.append(event)
        if event.status is Status.RUNNING:
            gate.set()
    assert seen[0].task_id == tid and seen[-1].status is Status.DONE and seen[-1].progress == 1
    assert seen[-1].finished and all(not e.finished for e in seen[:-1])
    assert len({(e.status, e.progress, e.message) for e in seen}) == len(seen)  # only changes


def test_events_of_a_document(client: Client, conn: psycopg.Connection[Any], worker: BackgroundWorker) -> None:
    doc = conn.execute("INSERT INTO documents (name, size, format, kind, parser, pages, content_digest, uri) "
                       "VALUES ('d.txt', 1, 'txt', 'text', 'general', 1, md5(random()::text), '/d.txt') "
                       "RETURNING id").fetchone()
    assert doc is not None
    ids = [client.enqueue("wt_ok", {"n": i}, doc_id=doc[0]) for i in range(3)]
    last: dict[int, TaskEvent] = {}
    for event in client.events(doc_id=doc[0], timeout=20):
        last[event.task_id] = event
    assert sorted(last) == ids and all(e.status is Status.DONE and e.doc_id == doc[0] for e in last.values())


def test_async_wait_and_events(db_url: str, worker: BackgroundWorker) -> None:
    async def go() -> tuple[Any, list[Status], str]:
        async with AsyncClient(db_url) as c:
            tid = await c.enqueue("wt_ok", {"n": 5})
            result = await c.wait(tid, timeout=20)
            statuses = [e.status async for e in c.events([tid], timeout=20)]
            failed = await c.enqueue("wt_fail", {})
            try:
                await c.wait(failed, timeout=20)
            except TaskFailed as exc:
                return result, statuses, exc.status
            raise AssertionError("no TaskFailed")

    assert asyncio.run(go()) == ({"doubled": 10}, [Status.DONE], "failed")


def test_completion_notifies_the_finished_channel(db_url: str, client: Client, worker: BackgroundWorker) -> None:
    """A task without a document finishing (complete_many) and one failing (finish_many) both notify."""
    with psycopg.connect(db_url, autocommit=True) as listen:
        listen.execute(f'LISTEN "{channel("finished")}"')
        ok, bad = client.enqueue("wt_ok", {"n": 1}), client.enqueue("wt_fail", {})
        heard: set[int] = set()
        for n in listen.notifies(timeout=20):
            heard |= {int(i) for i in n.payload.split(",") if i.isdigit()}
            if {ok, bad} <= heard:
                break
    assert {ok, bad} <= heard


def test_many_waiters_share_one_listener(db_url: str, worker: BackgroundWorker) -> None:
    gate.clear()
    clients = [Client(db_url) for _ in range(8)]
    ids = [clients[0].enqueue("wt_gated", {}) for _ in range(8)]
    results: list[Any] = []
    threads = [threading.Thread(target=lambda c=c, i=i: results.append(c.wait(i, timeout=20)))
               for c, i in zip(clients, ids, strict=True)]
    for t in threads:
        t.start()
    feeds = wait_for(lambda: [f for f in waits.hub().feeds.values() if f.users >= 8], timeout=10)
    assert len(feeds) == 1 and feeds[0].users == 8
    assert wait_for(lambda: feeds[0].listening, timeout=10)
    gate.set()
    for t in threads:
        t.join(20)
    assert results == ["opened"] * 8
    for c in clients:
        c.close()


def test_waiters_poll_without_listen(db_url: str, worker: BackgroundWorker) -> None:
    settings = get_settings().model_copy(update={"wait_listen": False, "wait_poll_seconds": 0.05})
    with Client(db_url, settings=settings) as c:
        before = dict(waits.hub().feeds)
        assert c.wait(c.enqueue("wt_ok", {"n": 2}), timeout=20) == {"doubled": 4}
        assert waits.hub().feeds.keys() <= before.keys()


def test_a_listen_that_hears_nothing_falls_back_to_polling(server_url: str, db_url: str,
                                                          worker: BackgroundWorker) -> None:
    """LISTEN on another database than the notifications' (as behind PgBouncer in transaction mode):
    the probe never arrives, so the feed is not trusted and waiters poll."""
    elsewhere = create_database(server_url)
    try:
        settings = get_settings().model_copy(update={"listen_url": elsewhere, "wait_poll_seconds": 0.05})
        with Client(db_url, settings=settings) as c:
            gate.clear()
            tid = c.enqueue("wt_gated", {})
            box: list[Any] = []
            t = threading.Thread(target=lambda: box.append(c.wait(tid, timeout=20)))
            t.start()
            feed = wait_for(lambda: waits.hub().feeds.get((elsewhere, settings.schema_name)), timeout=10)
            wait_for(lambda: feed.listener is not None and feed.listener.connected.is_set(), timeout=10)
            gate.set()
            t.join(20)
            assert box == ["opened"] and not feed.heard and not feed.listening
    finally:
        drop_database(server_url, elsewhere)


# ---------------------------------------------------------------- producers without handler code


class Thumbnail(BaseModel):
    url: str
    width: int = 256


def test_enqueue_an_unregistered_type(client: Client) -> None:
    tid = client.enqueue("wt_not_here", {"anything": [1, 2]})
    t = client.get(tid)
    assert t.type == "wt_not_here" and t.payload == {"anything": [1, 2]} and t.status == "queued"
    with pytest.raises(Exception, match="1-48 characters"):
        client.enqueue("no such type", {})


def test_a_declared_type_is_validated_without_a_handler(client: Client) -> None:
    declare("wt_thumbnail", payload=Thumbnail, priority=7, max_retries=1)
    try:
        tid = client.enqueue("wt_thumbnail", {"url": "s3://x.png"})
        t = client.get(tid)
        assert t.payload == {"url": "s3://x.png", "width": 256} and t.priority == 7 and t.max_retries == 1
        with pytest.raises(InvalidPayload, match="url"):
            client.enqueue("wt_thumbnail", {"width": 3})
    finally:
        unregister("wt_thumbnail")
