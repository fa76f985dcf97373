"""Client and AsyncClient: the same methods, results and errors, on a real PostgreSQL.

Every scenario runs on both clients (the `either` fixture). The races of issue 11 (items 13 and 14)
are made deterministic by parking the client's statement on a lock another connection holds, and
driver errors (item 23) by terminating the client's backend while it waits.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from support import SCHEMA, create_database, drop_database, wait_for

from jobqueue import AsyncClient, Client, DatabaseUnavailable, InvalidPayload, JobqError, TaskNotFound, TaskSpec, task
from jobqueue.db.queries import RuntimeSQL
from jobqueue.errors import ConfigurationError, DuplicateTask
from jobqueue.settings import Settings, get_settings


@task("cl_plain")
async def cl_plain(ctx: Any, payload: Any) -> None:
    return None


class AsyncAsSync:
    """An AsyncClient driven from plain code: each call runs on the client's own event loop."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = AsyncClient(url)
        self.url = url

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)
        return lambda *a, **kw: self._run(method(*a, **kw))

    def caller_connection(self) -> Any:
        """A connection of the caller's, in asyncpg's default mode (no transaction open)."""
        return self._run(asyncpg.connect(self.url))

    def close_connection(self, conn: Any) -> None:
        self._run(conn.close())

    def close(self) -> None:
        self._run(self.client.close())
        self.loop.close()


class SyncClient(Client):
    def caller_connection(self) -> Any:
        """A connection of the caller's in autocommit mode (no transaction open)."""
        return psycopg.connect(self.url, autocommit=True)

    def close_connection(self, conn: Any) -> None:
        conn.close()


@pytest.fixture(params=["sync", "async"])
def either(request: pytest.FixtureRequest, db_url: str, clean: None) -> Iterator[Any]:
    c: Any = SyncClient(db_url) if request.param == "sync" else AsyncAsSync(db_url)
    yield c
    c.close()


class Call(threading.Thread):
    """A client call in a thread, so the test can act while it waits on a lock."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the test
            self.error = exc

    def outcome(self) -> Any:
        self.join(30)
        assert not self.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.result


def lock_waiters(conn: psycopg.Connection[Any]) -> list[int]:
    """Backends of this database waiting on a lock, other than `conn` itself."""
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND pid <> pg_backend_pid()").fetchall()]


def status(conn: psycopg.Connection[Any], task_id: int) -> tuple[str, int]:
    row = conn.execute("SELECT status, pending_deps FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


# ---------------------------------------------------------------- the same method set


def test_both_clients_have_the_same_methods() -> None:
    public = {n for n in dir(Client) if not n.startswith("_")}
    apublic = {n for n in dir(AsyncClient) if not n.startswith("_")}
    assert public == apublic
    assert {"enqueue", "enqueue_many", "get", "list", "cancel", "retry", "close"} <= public


def test_list_filters_and_keyset_pages(either: Any) -> None:
    ids = [either.enqueue("cl_plain", {"i": i}, owner="ann" if i % 2 else "bob", labels=["x"] if i < 3 else None)
           for i in range(7)]
    assert [t.id for t in either.list()] == ids[::-1]
    assert [t.id for t in either.list(owner="ann")] == [ids[5], ids[3], ids[1]]
    assert [t.id for t in either.list(label="x", status="queued")] == [ids[2], ids[1], ids[0]]
    assert either.list(status=["done", "failed"]) == []
    assert either.list(type="nope") == []
    page1 = either.list(limit=3)
    page2 = either.list(limit=3, before_id=page1[-1].id)
    page3 = either.list(limit=3, before_id=page2[-1].id)
    assert [t.id for t in page1 + page2 + page3] == ids[::-1]
    with pytest.raises(InvalidPayload):
        either.list(limit=-1)


def test_list_finds_text_in_the_last_error(either: Any, conn: psycopg.Connection[Any]) -> None:
    ids = [either.enqueue("cl_plain", {}) for _ in range(3)]
    conn.execute("UPDATE tasks SET last_error = 'ValueError: Page 3 of ZQX is empty' WHERE id = %s", (ids[1],))
    assert [t.id for t in either.list(error="page 3 of zqx")] == [ids[1]]  # case-insensitive
    assert either.list(error="Pag_ 3 of ZQX") == []  # a plain substring, not a LIKE pattern
    assert [t.id for t in either.list(error="ZQX", before_id=ids[2])] == [ids[1]]
    with pytest.raises(InvalidPayload):
        either.list(error="a\x00b")


def test_get_reads_the_row_by_name(either: Any) -> None:
    tid = either.enqueue("cl_plain", {"a": [1, 2]}, priority=7, owner="o", labels=["l1"], digest="d")
    t = either.get(tid)
    assert (t.id, t.type, t.status, t.payload, t.priority, t.owner, t.labels, t.digest) == \
        (tid, "cl_plain", "queued", {"a": [1, 2]}, 7, "o", ["l1"], "d")
    with pytest.raises(TaskNotFound):
        either.get(tid + 1000)


def test_cancel_reports_alike(either: Any, conn: psycopg.Connection[Any]) -> None:
    queued, done = either.enqueue("cl_plain"), either.enqueue("cl_plain")
    conn.execute("UPDATE tasks SET status = 'done', finished_at = now() WHERE id = %s", (done,))
    assert either.cancel([queued, done]) == {queued: "cancelled", done: "done"}
    with pytest.raises(TaskNotFound):
        either.cancel(done + 1000)


# ---------------------------------------------------------------- issue 11, item 13


def test_depends_on_outside_a_transaction_locks_the_parent_until_the_child_exists(
        either: Any, conn: psycopg.Connection[Any], db_url: str) -> None:
    """The parent finishes while the child's insert waits: the child must still be released."""
    parent = either.enqueue("cl_plain")
    blocker = psycopg.connect(db_url)  # holds an uncommitted task with the child's dedupe key
    Client(db_url).enqueue("cl_plain", dedupe_key="k13", connection=blocker)
    caller = either.caller_connection()
    try:
        call = Call(lambda: either.enqueue("cl_plain", depends_on=[parent], dedupe_key="k13", connection=caller))
        call.start()
        wait_for(lambda: lock_waiters(conn))  # lock_parents ran, the insert waits on the blocker's key
        # The parent completes the way the runtime's completer does it: done, then release its children.
        # With the parent locked by the child's transaction this must wait; a short lock_timeout shows it.
        finished_early = _finish(db_url, parent, lock_timeout="300ms")
        blocker.rollback()
        child = call.outcome()
        if not finished_early:
            assert _finish(db_url, parent, lock_timeout="5s")
        assert status(conn, child) == ("queued", 0)
    finally:
        blocker.close()
        either.close_connection(caller)


def _finish(db_url: str, task_id: int, *, lock_timeout: str) -> bool:
    q = RuntimeSQL.load(SCHEMA)
    with psycopg.connect(db_url) as c:
        c.execute(f"SET lock_timeout = '{lock_timeout}'")
        try:
            c.execute("UPDATE tasks SET status = 'done', finished_at = now() WHERE id = %s", (task_id,))
        except psycopg.errors.LockNotAvailable:
            return False
        c.commit()
        with psycopg.RawCursor(c) as cur:
            cur.execute(q.release_dependents, ([task_id], "", 3000))
        c.commit()
    return True


# ---------------------------------------------------------------- issue 11, item 14 (enqueue_many)


def test_enqueue_many_returns_the_id_a_concurrent_producer_just_committed(
        either: Any, conn: psycopg.Connection[Any], db_url: str) -> None:
    rival = psycopg.connect(db_url)
    try:
        theirs = Client(db_url).enqueue("cl_plain", {"who": "rival"}, dedupe_key="k14", connection=rival)
        call = Call(lambda: either.enqueue_many("cl_plain", [TaskSpec({"who": "us"}, dedupe_key="k14"),
                                                             TaskSpec({"who": "us"}, dedupe_key="other")]))
        call.start()
        wait_for(lambda: lock_waiters(conn))  # our insert waits for the rival's key
        rival.commit()
        ids = call.outcome()
    finally:
        rival.close()
    assert ids[0] == theirs
    assert either.get(ids[1]).dedupe_key == "other"  # the rest of the batch was not rolled back
    assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (2,)


@pytest.mark.parametrize("labels", [None, [], ["blue", "x y"]], ids=["none", "empty", "two"])
def test_a_copy_batch_stores_each_payload_under_its_id_with_the_batch_labels(
        either: Any, conn: psycopg.Connection[Any], labels: list[str] | None) -> None:
    """A batch without labels leaves the column out of the COPY: the rows must read as if it were in."""
    ids = either.enqueue_many("cl_plain", [{"i": i} for i in range(300)] + [TaskSpec({"i": 300}, priority=7)],
                              labels=labels)
    assert len(set(ids)) == 301 and ids == sorted(ids)
    got = conn.execute("SELECT id, payload, labels, priority, run_at <= now(), trace_context FROM tasks "
                       "ORDER BY id").fetchall()
    assert [r[0] for r in got] == ids
    assert [r[1] for r in got] == [{"i": i} for i in range(301)]
    assert {tuple(r[2]) for r in got} == {tuple(labels or [])}
    assert [r[3] for r in got] == [0] * 300 + [7]
    assert all(r[4] is True and r[5] is None for r in got)


# ---------------------------------------------------------------- issue 11, item 20


@pytest.fixture
def long_schema(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    schema = "s" * 20
    monkeypatch.setenv("JOBQ_SCHEMA", schema)
    get_settings.cache_clear()
    yield schema
    monkeypatch.undo()
    get_settings.cache_clear()


def test_type_names_are_checked_at_registration_against_the_configured_schema(long_schema: str) -> None:
    room = 63 - len(long_schema) - 1
    task("n" * room)(cl_plain)  # `<schema>.<type>` is exactly 63 bytes: fine
    with pytest.raises(ConfigurationError, match="NOTIFY channel"):
        task("n" * (room + 1))(cl_plain)


@pytest.mark.parametrize("name", ["", "has space", "semi;colon", "ü", "x" * 49, "new\nline"])
def test_type_names_the_table_refuses_are_refused_at_registration(name: str) -> None:
    with pytest.raises(ConfigurationError):
        task(name)(cl_plain)


def test_longest_allowed_type_name_enqueues_and_notifies(db_url: str, client: Client) -> None:
    name = "L" * min(48, 63 - len(SCHEMA) - 1)
    task(name)(cl_plain)
    assert client.get(client.enqueue(name)).type == name


# ---------------------------------------------------------------- issue 11, item 21


def _nested(depth: int, leaf: Any = 0) -> Any:
    v = leaf
    for _ in range(depth):
        v = (v,)
    return v


@pytest.mark.parametrize("payload", [
    {"a": _nested(100)},
    {"a": _nested(200_000)},
    [_nested(70)],
    {"a": ({1: "int key"},)},
    ({True: 1},),
], ids=["tuple-depth-100", "tuple-depth-200000", "list-of-tuples", "int-key-in-tuple", "bool-key-in-tuple"])
def test_tuples_get_the_same_payload_checks_as_lists(either: Any, conn: psycopg.Connection[Any],
                                                     payload: Any) -> None:
    with pytest.raises(InvalidPayload):
        either.enqueue("cl_plain", payload)
    with pytest.raises(InvalidPayload):
        either.enqueue_many("cl_plain", [{"ok": 1}, payload])
    assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (0,)


def test_shallow_tuples_are_stored_as_arrays(either: Any) -> None:
    assert either.get(either.enqueue("cl_plain", {"a": (1, (2, "x"))})).payload == {"a": [1, [2, "x"]]}


@pytest.mark.parametrize("fields", [
    {"run_at": "2030-01-01T00:00:00"}, {"run_at": 1_900_000_000}, {"delay": "5"}, {"delay": 10**400},
    {"doc_id": "7"}, {"depends_on": 5},
])
def test_wrongly_typed_fields_are_one_line_errors(either: Any, fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidPayload):
        either.enqueue("cl_plain", **fields)
    spec = {k: v for k, v in fields.items() if k != "depends_on"}
    if spec:
        with pytest.raises(InvalidPayload):
            either.enqueue_many("cl_plain", [TaskSpec(**spec)])


def test_a_datetime_run_at_still_works(either: Any) -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    assert either.get(either.enqueue("cl_plain", run_at=at)).run_at == at


# ---------------------------------------------------------------- issue 11, item 23


CALLS: dict[str, Callable[[Any], Any]] = {
    "enqueue": lambda c: c.enqueue("cl_plain"),
    "enqueue_many_copy": lambda c: c.enqueue_many("cl_plain", [{"i": 1}, {"i": 2}]),
    "enqueue_many_dedupe": lambda c: c.enqueue_many("cl_plain", [TaskSpec(dedupe_key="d23")]),
    "get": lambda c: c.get(1),
    "list": lambda c: c.list(),
    "cancel": lambda c: c.cancel([1]),
}


@pytest.mark.parametrize("call_name", sorted(CALLS))
def test_connection_lost_mid_call_is_database_unavailable(either: Any, conn: psycopg.Connection[Any],
                                                          db_url: str, call_name: str) -> None:
    either.enqueue("cl_plain")  # opens the client's connection (pool) outside the clock
    locker = psycopg.connect(db_url)
    try:
        locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        call = Call(lambda: CALLS[call_name](either))
        call.start()
        victims = wait_for(lambda: [p for p in lock_waiters(conn) if p != locker.info.backend_pid])
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (victims,))
        with pytest.raises(DatabaseUnavailable):
            call.outcome()
    finally:
        locker.close()
    assert either.get(1).id == 1  # the client recovers: the next call gets a fresh connection


def test_retry_into_a_live_dedupe_key_is_a_jobq_error(either: Any, conn: psycopg.Connection[Any]) -> None:
    """Issue 11, item 14's second half: the database's unique violation reaches the user as a JobqError."""
    old = either.enqueue("cl_plain", dedupe_key="k14b")
    conn.execute("UPDATE tasks SET status = 'failed', finished_at = now() WHERE id = %s", (old,))
    live = either.enqueue("cl_plain", dedupe_key="k14b")
    assert live != old
    with pytest.raises(DuplicateTask, match=f"held by live task {live}"):
        either.retry(old)
    assert status(conn, old) == ("failed", 0)


def test_translate_covers_asyncpg_client_side_errors() -> None:
    from jobqueue.db.errors import translate

    assert isinstance(translate(asyncpg.exceptions.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress")), DatabaseUnavailable)
    assert isinstance(translate(asyncpg.InterfaceError("connection is closed")), DatabaseUnavailable)
    assert isinstance(translate(ConnectionResetError("reset by peer")), DatabaseUnavailable)


def test_a_database_without_the_schema_is_a_jobq_error(server_url: str) -> None:
    empty = create_database(server_url)
    try:
        sync = Client(empty)
        asyn = AsyncAsSync(empty)
        for c in (sync, asyn):
            for name, fn in CALLS.items():
                with pytest.raises(JobqError, match="jobq migrate"):
                    fn(c)
                assert name
            c.close()
    finally:
        drop_database(server_url, empty)


# ---------------------------------------------------------------- the library never starts a server


def test_no_url_and_no_running_server_is_a_configuration_error(tmp_path: Path) -> None:
    settings = Settings(database_url=None, home=tmp_path / "home")
    for c in (Client(settings=settings), AsyncClient(settings=settings)):
        with pytest.raises(ConfigurationError, match="jobq db start"):
            c.url  # noqa: B018
    assert not (tmp_path / "home").exists()  # nothing was created, let alone started
