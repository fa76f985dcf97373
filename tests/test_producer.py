"""The producer API: enqueue, transactional enqueue on three connection kinds, dedupe, COPY batches,
NOTIFY once per statement on commit only, validation that writes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import psycopg
import pytest
from pydantic import BaseModel
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from support import channel

from jobqueue import AsyncClient, Client, InvalidPayload, TaskSpec, UnknownTaskType, task
from jobqueue.errors import InvalidTransition, TaskNotFound


class Page(BaseModel):
    doc: str
    page: int


@task("t_plain")
async def t_plain(ctx: Any, payload: Any) -> None:
    return None


@task("t_typed", payload=Page)
async def t_typed(ctx: Any, payload: Page) -> None:
    return None


def count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM tasks").fetchone()
    assert row is not None
    return int(row[0])


def test_enqueue_and_get(client: Client, clean: None) -> None:
    tid = client.enqueue("t_plain", {"a": 1}, priority=5, owner="alice", labels=["x", "y"])
    t = client.get(tid)
    assert (t.type, t.status, t.priority, t.payload, t.owner, t.labels) == (
        "t_plain", "queued", 5, {"a": 1}, "alice", ["x", "y"])
    assert t.attempt == 0 and t.retry_count == 0 and t.max_retries == 3


def test_delay_and_run_at(client: Client, clean: None) -> None:
    t1 = client.get(client.enqueue("t_plain", {}, delay=60))
    assert t1.run_at > datetime.now(UTC) + timedelta(seconds=50)
    when = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert client.get(client.enqueue("t_plain", {}, run_at=when)).run_at == when


def test_dedupe_returns_live_task(client: Client, conn: psycopg.Connection[Any], clean: None) -> None:
    a = client.enqueue("t_plain", {"n": 1}, dedupe_key="doc-1")
    b = client.enqueue("t_plain", {"n": 2}, dedupe_key="doc-1")
    assert a == b and count(conn) == 1
    conn.execute("UPDATE tasks SET status = 'done' WHERE id = %s", (a,))
    c = client.enqueue("t_plain", {"n": 3}, dedupe_key="doc-1")  # a finished task frees its key
    assert c != a and count(conn) == 2


def test_enqueue_many_with_dedupe_keys(client: Client, conn: psycopg.Connection[Any], clean: None) -> None:
    first = client.enqueue("t_plain", {}, dedupe_key="k0")
    ids = client.enqueue_many("t_plain", [TaskSpec(payload={"i": i}, dedupe_key=f"k{i % 3}") for i in range(6)])
    assert ids[0] == first
    assert ids[0] == ids[3] and ids[1] == ids[4] and ids[2] == ids[5]
    assert count(conn) == 3


def test_copy_batch_of_50000(client: Client, conn: psycopg.Connection[Any], clean: None) -> None:
    ids = client.enqueue_many("t_plain", ({"i": i} for i in range(50_000)))
    assert len(ids) == len(set(ids)) == 50_000
    assert count(conn) == 50_000
    row = conn.execute("SELECT payload FROM tasks WHERE id = %s", (ids[12345],)).fetchone()
    assert row == ({"i": 12345},)


def test_async_enqueue_many_copy(db_url: str, conn: psycopg.Connection[Any], clean: None) -> None:
    async def go() -> list[int]:
        async with AsyncClient(db_url) as ac:
            return await ac.enqueue_many("t_plain", [{"i": i} for i in range(1000)])

    ids = asyncio.run(go())
    assert len(ids) == 1000 and count(conn) == 1000


LATE = 700  # in a later chunk of the COPY of bare payloads, not the first (encode.chunks)


def _with_a_bad_payload(at: int = LATE) -> list[Any]:
    return [{"i": i} if i != at else {"x": float("nan")} for i in range(1000)]


@pytest.mark.parametrize("at", [10, LATE], ids=["while the ids are reserved", "late in the COPY"])
def test_a_bad_payload_in_a_copy_writes_nothing_on_either_client(db_url: str, client: Client,
                                                                 conn: psycopg.Connection[Any],
                                                                 clean: None, at: int) -> None:
    """Bare batches are validated chunk by chunk as the COPY goes (the async client makes the first
    chunks' payloads while the ids' statement runs): a refusal at either moment must write nothing and
    leave the connection usable."""
    with pytest.raises(InvalidPayload, match="JSON"):
        client.enqueue_many("t_plain", _with_a_bad_payload(at))
    assert count(conn) == 0
    assert len(client.enqueue_many("t_plain", [{"i": 1}])) == 1

    async def go() -> None:
        async with AsyncClient(db_url) as ac:
            with pytest.raises(InvalidPayload, match="JSON"):
                await ac.enqueue_many("t_plain", _with_a_bad_payload(at))
            assert len(await ac.enqueue_many("t_plain", [{"i": 2}])) == 1

    asyncio.run(go())
    assert count(conn) == 2


def test_a_bare_batch_cancelled_at_any_step_writes_all_or_nothing(db_url: str, conn: psycopg.Connection[Any],
                                                                clean: None) -> None:
    """A caller cancelled while its batch's ids are reserved or its COPY runs: the batch is written
    whole or not at all, and the client's connection goes back to the pool usable."""
    async def go() -> list[int]:
        written = []
        async with AsyncClient(db_url) as ac:
            for steps, wait in [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (1, 0.001), (1, 0.003), (1, 0.01), (1, 2.0)]:
                before = count(conn)
                call = asyncio.ensure_future(ac.enqueue_many("t_plain", [{"i": i} for i in range(3000)]))
                for _ in range(steps):
                    await asyncio.sleep(0)
                if wait:
                    await asyncio.wait([call], timeout=wait)
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
                written.append(count(conn) - before)
                assert len(await ac.enqueue_many("t_plain", [{"i": -1}] * 2)) == 2  # the pool still works
        return written

    written = asyncio.run(go())
    assert set(written) <= {0, 3000} and written[0] == 0 and written[-1] == 3000, written


def test_a_bad_payload_in_a_copy_leaves_the_callers_transaction_usable(db_url: str, client: Client,
                                                                       conn: psycopg.Connection[Any],
                                                                       clean: None) -> None:
    """On the caller's connection the batch is refused before the COPY starts: their transaction goes on."""
    with psycopg.connect(db_url) as mine:
        with pytest.raises(InvalidPayload, match="JSON"):
            client.enqueue_many("t_plain", _with_a_bad_payload(), connection=mine)
        client.enqueue_many("t_plain", [{"i": 1}], connection=mine)
        mine.commit()

    async def go() -> None:
        theirs = await asyncpg.connect(db_url)
        try:
            async with theirs.transaction(), AsyncClient(db_url) as ac:
                with pytest.raises(InvalidPayload, match="JSON"):
                    await ac.enqueue_many("t_plain", _with_a_bad_payload(), connection=theirs)
                await ac.enqueue_many("t_plain", [{"i": 2}], connection=theirs)
        finally:
            await theirs.close()

    asyncio.run(go())
    assert count(conn) == 2


def _listen(db_url: str, channel: str) -> psycopg.Connection[Any]:
    listener = psycopg.connect(db_url, autocommit=True)
    listener.execute(f'LISTEN "{channel}"')
    return listener


def _drain_notifies(listener: psycopg.Connection[Any], wait: float = 0.3) -> list[str]:
    got: list[str] = []
    select.select([listener.pgconn.socket], [], [], wait)
    for n in listener.notifies(timeout=wait, stop_after=None):
        got.append(n.payload)
        if len(got) > 100_000:
            break
    return got


def test_notify_once_per_statement_on_commit_only(db_url: str, client: Client, clean: None) -> None:
    listener = _listen(db_url, channel("t_plain"))
    try:
        with psycopg.connect(db_url) as tx:
            client.enqueue_many("t_plain", [{"i": i} for i in range(10_000)], connection=tx)
            assert _drain_notifies(listener, 0.2) == []  # nothing before commit
            tx.commit()
        assert len(_drain_notifies(listener)) == 1
        # plain SQL inserts wake workers too
        with psycopg.connect(db_url, autocommit=True) as c:
            c.execute("INSERT INTO tasks (type) SELECT 't_plain' FROM generate_series(1, 500)")
        assert len(_drain_notifies(listener)) == 1
    finally:
        listener.close()


def test_transactional_enqueue_psycopg(db_url: str, client: Client, conn: psycopg.Connection[Any],
                                       clean: None) -> None:
    with psycopg.connect(db_url) as tx:
        client.enqueue("t_plain", {"n": 1}, connection=tx)
        assert count(conn) == 0  # invisible until the caller commits
        tx.rollback()
    assert count(conn) == 0
    with psycopg.connect(db_url) as tx:
        tid = client.enqueue("t_plain", {"n": 2}, connection=tx)
        tx.commit()
    assert client.get(tid).payload == {"n": 2}


def test_transactional_enqueue_sqlalchemy(db_url: str, client: Client, conn: psycopg.Connection[Any],
                                          clean: None) -> None:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with Session(engine) as session:
            client.enqueue("t_plain", {"via": "session"}, connection=session)
            session.rollback()
        assert count(conn) == 0
        with engine.begin() as sa_conn:
            client.enqueue("t_plain", {"via": "connection"}, connection=sa_conn)
        with Session(engine) as session:
            client.enqueue("t_plain", {"via": "session"}, connection=session)
            session.commit()
        assert count(conn) == 2
    finally:
        engine.dispose()


def test_transactional_enqueue_asyncpg(db_url: str, conn: psycopg.Connection[Any], clean: None) -> None:
    async def go() -> int:
        ac = AsyncClient(db_url)
        c = await asyncpg.connect(db_url)
        try:
            tx = c.transaction()
            await tx.start()
            await ac.enqueue("t_plain", {"n": 1}, connection=c)
            await tx.rollback()
            async with c.transaction():
                tid = await ac.enqueue("t_plain", {"n": 2}, connection=c)
            return tid
        finally:
            await c.close()
            await ac.close()

    tid = asyncio.run(go())
    assert count(conn) == 1
    row = conn.execute("SELECT payload FROM tasks WHERE id = %s", (tid,)).fetchone()
    assert row == ({"n": 2},)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"payload": {"doc": "a"}}, "page"),
        ({"payload": {"doc": "a", "page": "x"}}, "page"),
        ({"payload": {"bad": "\x00"}, "type": "t_plain"}, "NUL"),
        ({"payload": {"x": float("nan")}, "type": "t_plain"}, "JSON"),
        ({"payload": {}, "type": "t_plain", "priority": 2**40}, "32 bits"),
        ({"payload": {}, "type": "t_plain", "dedupe_key": "a\x00b"}, "NUL"),
        ({"payload": {"s": "\ud800"}, "type": "t_plain"}, "Unicode"),
    ],
)
def test_invalid_input_writes_nothing(client: Client, conn: psycopg.Connection[Any], clean: None,
                                      kwargs: dict[str, Any], message: str) -> None:
    kwargs = dict(kwargs)
    ttype = kwargs.pop("type", "t_typed")
    payload = kwargs.pop("payload")
    with pytest.raises(InvalidPayload, match=message):
        client.enqueue(ttype, payload, **kwargs)
    assert count(conn) == 0


def test_payload_model_validates_and_normalises(client: Client) -> None:
    tid = client.enqueue("t_typed", {"doc": "a", "page": "3"})
    assert client.get(tid).payload == {"doc": "a", "page": 3}


def test_deep_and_huge_payloads(client: Client, conn: psycopg.Connection[Any], clean: None) -> None:
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    with pytest.raises(InvalidPayload, match="nested"):
        client.enqueue("t_plain", deep)
    with pytest.raises(InvalidPayload, match="limit"):
        client.enqueue("t_plain", {"blob": "x" * 2_000_000})
    assert count(conn) == 0
    shaped = {"a": [1, 2.5, None, True, {"b": "é\u2028🙂"}], "s": "'; DROP TABLE tasks; --"}
    assert client.get(client.enqueue("t_plain", shaped)).payload == shaped


def test_database_limit_holds_for_plain_sql(conn: psycopg.Connection[Any]) -> None:
    big = json.dumps({"blob": "y" * 3_000_000})
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO tasks (type, payload) VALUES ('t_plain', %s::jsonb)", (big,))


def test_unregistered_type_is_accepted_and_a_bad_name_refused(client: Client) -> None:
    """A producer need not import the handlers (issue 15); a name the table would refuse still fails."""
    assert client.get(client.enqueue("no_such_type", {})).type == "no_such_type"
    with pytest.raises(UnknownTaskType, match="1-48 characters"):
        client.enqueue("no such type", {})


def test_cancel_and_retry(client: Client, conn: psycopg.Connection[Any], clean: None) -> None:
    tid = client.enqueue("t_plain", {})
    assert client.cancel(tid) == {tid: "cancelled"}
    t = client.get(tid)
    assert t.status == "cancelled" and "[Canceled]" in t.progress_msg and t.finished_at is not None
    assert client.cancel(tid) == {tid: "cancelled"}  # idempotent
    client.retry(tid)
    assert client.get(tid).status == "queued"
    with pytest.raises(InvalidTransition):
        client.retry(tid)
    with pytest.raises(TaskNotFound):
        client.retry(999_999_999)
    with pytest.raises(TaskNotFound):
        client.get(999_999_999)


def test_list_filters(client: Client, clean: None) -> None:
    a = client.enqueue("t_plain", {}, owner="alice", labels=["red"])
    b = client.enqueue("t_plain", {}, owner="bob")
    client.cancel(b)
    assert [t.id for t in client.list(owner="alice")] == [a]
    assert [t.id for t in client.list(status="cancelled")] == [b]
    assert [t.id for t in client.list(label="red")] == [a]
    assert [t.id for t in client.list(type="t_plain", limit=1)] == [b]


def test_depends_on_unknown_parent(client: Client, conn: psycopg.Connection[Any], clean: None) -> None:
    with pytest.raises(TaskNotFound):
        client.enqueue("t_plain", {}, depends_on=[123456789])
    assert count(conn) == 0


def test_dependency_on_cancelled_parent_is_cancelled(client: Client, clean: None) -> None:
    parent = client.enqueue("t_plain", {})
    client.cancel(parent)
    child = client.get(client.enqueue("t_plain", {}, depends_on=[parent]))
    assert child.status == "cancelled" and f"parent task {parent}" in child.progress_msg


def test_cancel_parent_cancels_waiting_child(client: Client, clean: None) -> None:
    parent = client.enqueue("t_plain", {})
    child = client.enqueue("t_plain", {}, depends_on=[parent])
    grandchild = client.enqueue("t_plain", {}, depends_on=[child])
    assert client.get(child).status == "waiting"
    client.cancel(parent)
    assert client.get(child).status == "cancelled"
    assert client.get(grandchild).status == "cancelled"
