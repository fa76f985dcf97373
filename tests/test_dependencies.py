"""Dependencies: a dependent is released exactly once, and a failed parent cancels it."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import REPO, SCHEMA, BackgroundWorker, wait_for

from jobq_workers.documents import enqueue_files
from jobqueue import AsyncClient, Client, Context, task
from jobqueue.db.queries import RuntimeSQL
from jobqueue.errors import DuplicateTask, InvalidPayload, InvalidTransition
from jobqueue.registry import unregister

HANDBOOK = str(REPO / "examples" / "samples" / "handbook.pdf")
runs: Counter[int] = Counter()
lock = threading.Lock()


@pytest.fixture(scope="module", autouse=True)
def dep_types() -> Any:
    def record(ctx: Context, payload: Any) -> None:
        with lock:
            runs[ctx.id] += 1

    task("dep_parent")(record)
    task("dep_child")(record)
    yield
    unregister("dep_parent")
    unregister("dep_child")


def test_release_happens_exactly_once_under_two_workers(conn: psycopg.Connection[Any], client: Client) -> None:
    runs.clear()
    children = []
    for _ in range(10):
        parents = client.enqueue_many("dep_parent", [{} for _ in range(8)])
        children.append(client.enqueue("dep_child", {}, depends_on=parents))
    with BackgroundWorker(["dep_parent", "dep_child"], concurrency=8, poll_seconds=0.1), \
            BackgroundWorker(["dep_parent", "dep_child"], concurrency=8, poll_seconds=0.1):
        wait_for(lambda: conn.execute("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'done'",
                                      (children,)).fetchone()[0] == len(children), timeout=30)
    assert all(runs[c] == 1 for c in children)
    rows = conn.execute("SELECT attempt, pending_deps, status FROM tasks WHERE id = ANY(%s)",
                        (children,)).fetchall()
    assert rows == [(1, 0, "done")] * len(children)
    assert all(n == 1 for n in runs.values()) and len(runs) == 90


def test_document_raptor_runs_once_under_two_workers(conn: psycopg.Connection[Any]) -> None:
    res = enqueue_files([HANDBOOK], then="raptor", pages="1-24", page_size=3).files[0]
    with BackgroundWorker(["dataflow", "raptor"], concurrency=4, poll_seconds=0.1), \
            BackgroundWorker(["dataflow", "raptor"], concurrency=4, poll_seconds=0.1):
        wait_for(lambda: conn.execute("SELECT status FROM tasks WHERE id = %s",
                                      (res.then_task,)).fetchone()[0] == "done", timeout=60)
    attempt, result = conn.execute("SELECT attempt, result FROM tasks WHERE id = %s",
                                   (res.then_task,)).fetchone()
    summaries = conn.execute("SELECT count(*) FROM chunks WHERE doc_id = %s AND level > 0",
                             (res.doc_id,)).fetchone()[0]
    assert attempt == 1 and summaries == result["summaries"] > 0


def test_a_failed_parent_cancels_the_dependent(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    shared = tmp_path / "handbook.pdf"
    shutil.copy(HANDBOOK, shared)
    res = enqueue_files([str(shared)], then="raptor", by_reference=True, pages="1-14").files[0]
    shared.write_bytes(b"%PDF-1.4 replaced")  # the parents will fail for good (content changed)
    with BackgroundWorker(["dataflow", "raptor"], poll_seconds=0.1):
        wait_for(lambda: conn.execute("SELECT status FROM document_progress WHERE doc_id = %s",
                                      (res.doc_id,)).fetchone()[0] in ("failed", "cancelled", "done"), timeout=30)
    child = conn.execute("SELECT status, attempt, progress_msg FROM tasks WHERE id = %s",
                         (res.then_task,)).fetchone()
    assert child[0] == "cancelled" and child[1] == 0 and "[Canceled] parent task" in child[2]
    assert conn.execute("SELECT status FROM document_progress WHERE doc_id = %s",
                        (res.doc_id,)).fetchone()[0] == "failed"
    assert conn.execute("SELECT count(*) FROM chunks WHERE doc_id = %s", (res.doc_id,)).fetchone()[0] == 0


def _status(conn: psycopg.Connection[Any], *ids: int) -> list[tuple[str, int]]:
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT status, pending_deps FROM tasks WHERE id = ANY(%s) ORDER BY array_position(%s, id)",
        (list(ids), list(ids))).fetchall()]


def test_retry_waits_for_a_cancelled_parent_until_it_is_retried_and_done(
        conn: psycopg.Connection[Any], client: Client) -> None:
    runs.clear()
    parent = client.enqueue("dep_parent", {}, delay=3600)
    child = client.enqueue("dep_child", {}, depends_on=[parent])
    client.cancel(parent)
    assert _status(conn, parent, child) == [("cancelled", 0), ("cancelled", 1)]
    # Retrying the child alone must not make it runnable while its parent is cancelled.
    assert client.retry(child) == {child: "waiting"}
    assert _status(conn, child) == [("waiting", 1)]
    assert client.retry(parent) == {parent: "queued"}
    conn.execute("UPDATE tasks SET run_at = now() WHERE id = %s", (parent,))
    with BackgroundWorker(["dep_parent", "dep_child"], poll_seconds=0.1):
        wait_for(lambda: _status(conn, child) == [("done", 0)])
    assert runs[parent] == runs[child] == 1


def test_retry_waits_for_a_parent_that_is_still_queued(conn: psycopg.Connection[Any], client: Client) -> None:
    parent = client.enqueue("dep_parent", {}, delay=3600)
    child = client.enqueue("dep_child", {}, depends_on=[parent])
    client.cancel(child)  # the child alone: its parent stays queued
    assert client.retry(child) == {child: "waiting"}
    assert _status(conn, parent, child) == [("queued", 0), ("waiting", 1)]
    client.cancel(parent)  # and the cascade still reaches the retried child
    assert _status(conn, child) == [("cancelled", 1)]


def test_retrying_a_document_requeues_its_ranges_before_its_follow_up(conn: psycopg.Connection[Any],
                                                                      client: Client) -> None:
    res = enqueue_files([HANDBOOK], then="raptor", pages="1-9", page_size=3).files[0]
    client.cancel(doc_id=res.doc_id)
    conn.execute("UPDATE tasks SET status = 'failed', finished_at = now() WHERE id = %s", (res.tasks[0],))
    retried = client.retry(doc_id=res.doc_id)
    assert retried == {**{t: "queued" for t in res.tasks}, res.then_task: "waiting"}
    assert _status(conn, res.then_task) == [("waiting", len(res.tasks))]
    with pytest.raises(InvalidTransition, match=f"document {res.doc_id} has no failed or cancelled task"):
        client.retry(doc_id=res.doc_id)
    with pytest.raises(InvalidPayload, match="needs a task id or a doc_id"):
        client.retry()
    client.cancel(doc_id=res.doc_id)


def test_retry_into_a_live_dedupe_key_is_a_jobq_error(conn: psycopg.Connection[Any], client: Client) -> None:
    first = client.enqueue("dep_parent", {}, dedupe_key="dep-key", delay=3600)
    client.cancel(first)
    live = client.enqueue("dep_parent", {}, dedupe_key="dep-key", delay=3600)
    with pytest.raises(DuplicateTask, match=f"task {first} cannot be retried: its dedupe key 'dep-key' is held by "
                                             f"live task {live}"):
        client.retry(first)

    async def via_async() -> None:
        async with AsyncClient() as aclient:
            with pytest.raises(DuplicateTask, match=f"held by live task {live}"):
                await aclient.retry(first)
            await aclient.cancel(live)
            assert await aclient.retry(first) == {first: "queued"}

    asyncio.run(via_async())
    client.cancel(first)


def test_retry_racing_its_parents_completion_is_released(db_url: str, conn: psycopg.Connection[Any],
                                                         client: Client) -> None:
    """The parent finishes while the retry waits for its row: the retry must see it done (it reads the
    parent as locked, not from its own older snapshot), or the child would wait forever."""
    parent = client.enqueue("dep_parent", {}, delay=3600)
    child = client.enqueue("dep_child", {}, depends_on=[parent])
    client.cancel(child)
    q = RuntimeSQL.load(SCHEMA)
    outcome: dict[int, str] = {}
    with psycopg.connect(db_url) as worker:  # a worker completing the parent, not yet committed
        worker.execute("UPDATE tasks SET status = 'done', finished_at = now() WHERE id = %s", (parent,))
        with psycopg.RawCursor(worker) as cur:
            cur.execute(q.release_dependents, ([parent], "", 3000))  # the child is cancelled: nothing to release
        retry = threading.Thread(target=lambda: outcome.update(client.retry(child)))
        retry.start()
        wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                      "AND datname = current_database()").fetchone()[0] == 1)
        worker.commit()
        retry.join(10)
    assert outcome == {child: "queued"}
    assert _status(conn, child) == [("queued", 0)]
    client.cancel(child)
