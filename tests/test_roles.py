"""`jobq roles`: what jobq_dashboard, jobq_producer and jobq_worker can and cannot do.

The roles are created by the real command; each check then runs as the role (SET ROLE on a
superuser connection, or a login user made a member of the role, exactly as the docs tell users to).
Every "cannot" is asserted on the specific permission error, so a missing table or a typo cannot
pass for a refusal.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import errors
from support import SCHEMA, BackgroundWorker, jobq_cli, wait_for

from jobq_workers.documents import enqueue_files
from jobqueue import AsyncClient, Client, Context, task
from jobqueue.admin.roles import scram_verifier
from jobqueue.errors import InvalidPayload, PermissionDenied

PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
# `jobq roles` names the roles after the schema by default (jobq_dashboard, ...).
DASHBOARD, PRODUCER, WORKER = (f"{SCHEMA}_{kind}" for kind in ("dashboard", "producer", "worker"))


@task("r_ok")
async def r_ok(ctx: Context, payload: Any) -> Any:
    return {"by": "worker role"}


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture(scope="module")
def roles(db_url: str) -> str:
    res = jobq_cli("roles")
    assert res.returncode == 0, res.stderr
    assert DASHBOARD in res.stdout and WORKER in res.stdout
    again = jobq_cli("roles")  # idempotent
    assert again.returncode == 0, again.stderr
    return db_url


@pytest.fixture
def as_role(roles: str) -> Iterator[Any]:
    conns: list[psycopg.Connection[Any]] = []

    def make(role: str) -> psycopg.Connection[Any]:
        c = psycopg.connect(roles, autocommit=True)
        c.execute(f"SET ROLE {role}")
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


def relations(conn: psycopg.Connection[Any]) -> dict[str, str]:
    rows = conn.execute(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'v')", (SCHEMA,)
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def granted(conn: psycopg.Connection[Any], role: str, rel: str) -> set[str]:
    return {
        p
        for p in PRIVILEGES
        if conn.execute("SELECT has_table_privilege(%s, %s, %s)", (role, f"{SCHEMA}.{rel}", p)).fetchone()
        == (True,)
    }


def denied(conn: psycopg.Connection[Any], statement: str, *params: Any) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement, params or None)


def test_dashboard_reads_everything_writes_nothing(conn: psycopg.Connection[Any], as_role: Any) -> None:
    rels = relations(conn)
    for view in ("queue_depth", "throughput", "latency", "worker_health", "failures"):
        assert rels.get(view) == "v"
    assert {"tasks", "workers", "queues"} <= set(rels)
    for rel in rels:
        assert granted(conn, DASHBOARD, rel) == {"SELECT"}, rel

    conn.execute("INSERT INTO tasks (type) VALUES ('r_seen')")
    dash = as_role(DASHBOARD)
    for rel in rels:
        dash.execute(f"SELECT * FROM {rel} LIMIT 1").fetchall()
    assert dash.execute("SELECT queued FROM queue_depth WHERE type = 'r_seen'").fetchone() == (1,)
    denied(dash, "INSERT INTO tasks (type) VALUES ('x')")
    denied(dash, "UPDATE tasks SET priority = 1")
    denied(dash, "DELETE FROM tasks")
    denied(dash, "TRUNCATE tasks")
    denied(dash, "UPDATE workers SET done = 0")
    denied(dash, "INSERT INTO queues (type, paused) VALUES ('x', true)")
    denied(dash, "SELECT nextval('tasks_id_seq')")
    denied(dash, "CREATE TABLE evil (x int)")
    denied(dash, "CREATE VIEW evil AS SELECT 1")
    with pytest.raises(errors.InsufficientPrivilege):  # must be owner
        dash.execute("DROP VIEW queue_depth")
    with pytest.raises(errors.InsufficientPrivilege):
        dash.execute("ALTER TABLE tasks ADD COLUMN evil int")
    conn.execute("DELETE FROM tasks WHERE type = 'r_seen'")


def test_dashboard_login_is_read_only(conn: psycopg.Connection[Any]) -> None:
    settings = conn.execute(
        "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s "
        "JOIN pg_roles r ON r.oid = s.setrole "
        "WHERE r.rolname = %s AND s.setdatabase = 0", (DASHBOARD,)
    ).fetchone()
    assert settings is not None and "default_transaction_read_only=on" in settings[0]


def test_producer_enqueues_reads_cancels_but_never_deletes(
    conn: psycopg.Connection[Any], as_role: Any, db_url: str
) -> None:
    for rel in relations(conn):
        assert not granted(conn, PRODUCER, rel) & {"DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}, rel
    assert granted(conn, PRODUCER, "workers") == set()
    prod = as_role(PRODUCER)
    client = Client(db_url)
    try:
        one = client.enqueue("r_ok", {"n": 1}, connection=prod)
        many = client.enqueue_many("r_ok", [{"n": i} for i in range(5)], connection=prod)
        keyed = client.enqueue("r_ok", {}, dedupe_key=f"k-{uuid.uuid4()}", connection=prod)
        assert client.get(one, connection=prod).status == "queued"
        assert len(client.list(type="r_ok", connection=prod)) == 7
        assert client.cancel([one, *many], connection=prod) == {i: "cancelled" for i in [one, *many]}
        client.retry(one, connection=prod)
        assert client.get(one, connection=prod).status == "queued"
    finally:
        client.close()
    denied(prod, "DELETE FROM tasks WHERE id = %s", keyed)
    # The views that only count tasks are readable (the web console's overview and failures); the fleet's
    # health (workers' hosts and pids) and every document's chunks are not.
    for view in ("queue_depth", "throughput", "latency", "failures"):
        prod.execute(f"SELECT * FROM {view} LIMIT 1").fetchall()
    assert prod.execute("SELECT sum(queued) FROM queue_depth WHERE type = 'r_ok'").fetchone() == (2,)
    for rel in ("worker_health", "workers", "document_chunks", "chunks"):
        denied(prod, f"SELECT * FROM {rel} LIMIT 1")
    # Its one way to delete: replacing a re-enqueued document's finished run.
    prod.execute("SELECT replace_document_run(-1, '{}'::bigint[])")
    dash = as_role(DASHBOARD)
    denied(dash, "SELECT replace_document_run(-1, '{}'::bigint[])")
    denied(prod, "TRUNCATE tasks")
    denied(prod, "INSERT INTO workers (id, host, pid, types, concurrency) VALUES ('x', 'h', 1, '{}', 1)")
    denied(prod, "UPDATE queues SET paused = true")
    denied(prod, "CREATE TABLE evil (x int)")
    with pytest.raises(errors.InsufficientPrivilege):
        prod.execute("ALTER TABLE tasks ADD COLUMN evil int")
    conn.execute("DELETE FROM tasks WHERE type = 'r_ok'")


@pytest.fixture
def producers(conn: psycopg.Connection[Any], roles: str) -> Iterator[tuple[str, str]]:
    """Two login users in the producer role, as docs/roles.md tells users to make them."""
    names = tuple(f"jobq_t_prod_{uuid.uuid4().hex[:8]}" for _ in range(2))
    for name in names:
        conn.execute(f"CREATE ROLE {name} LOGIN IN ROLE {PRODUCER}")
    yield names[0], names[1]
    for name in names:
        conn.execute(f"DROP ROLE {name}")


def _finished(conn: psycopg.Connection[Any], status: str, by: str | None, **cols: Any) -> int:
    """A task in any state, written by the owner as a worker would have left it."""
    names = ["type", "status", "enqueued_by", *cols]
    row = conn.execute(
        f"INSERT INTO tasks ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))}) RETURNING id",
        ("r_ok", status, by, *cols.values()),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_producer_cannot_forge_what_only_a_worker_writes(conn: psycopg.Connection[Any], as_role: Any) -> None:
    queued = _finished(conn, "queued", PRODUCER)
    running = _finished(conn, "running", PRODUCER, worker_id="w1", attempt=1,
                       lease_expires_at=datetime.now(UTC) + timedelta(minutes=5))
    parent = _finished(conn, "running", PRODUCER, worker_id="w1", attempt=1, has_dependents=True,
                       lease_expires_at=datetime.now(UTC) + timedelta(minutes=5))
    prod = as_role(PRODUCER)
    try:
        # Done with a forged result; a running task back to queued (a second run).
        denied(prod, "UPDATE tasks SET status = 'done', result = '{\"forged\": 1}' WHERE id = %s", queued)
        denied(prod, "UPDATE tasks SET status = 'queued', worker_id = NULL WHERE id = %s", running)
        denied(prod, "UPDATE tasks SET cancel_requested_at = now() WHERE id = %s", running)
        # Rows only a claim makes: running (with or without a lease), done, failed.
        for status in ("running", "done", "failed"):
            denied(prod, "INSERT INTO tasks (type, status) VALUES ('r_ok', %s)", status)
        denied(prod, "INSERT INTO tasks (type, worker_id, lease_expires_at) VALUES ('r_ok', 'w', now())")
        denied(prod, "INSERT INTO tasks (type, result) VALUES ('r_ok', '{}')")
        denied(prod, "INSERT INTO tasks (type, enqueued_by) VALUES ('r_ok', 'someone_else')")
        # A parent that forgot its dependents would never release them; marking one is allowed.
        denied(prod, "UPDATE tasks SET has_dependents = false WHERE id = %s", parent)
        assert prod.execute("UPDATE tasks SET has_dependents = true WHERE id = %s", (queued,)).rowcount == 1
        # The shared cascade runs with the caller's rights: a producer cannot cancel through it.
        denied(prod, "SELECT * FROM cancel_dependents(ARRAY[%s]::bigint[], 'x', 100)", queued)
        # What enqueue writes stays possible, and the database records who enqueued.
        row = prod.execute("INSERT INTO tasks (type, status) VALUES ('r_ok', 'waiting') RETURNING enqueued_by")
        assert row.fetchone() == (PRODUCER,)
        rows = conn.execute("SELECT status, result, worker_id FROM tasks WHERE id = ANY(%s) ORDER BY id",
                            ([queued, running],)).fetchall()
        assert rows == [("queued", None, None), ("running", None, "w1")]
    finally:
        conn.execute("DELETE FROM tasks WHERE type = 'r_ok'")


def test_producer_cancels_and_retries_only_its_own_tasks(
    conn: psycopg.Connection[Any], roles: str, producers: tuple[str, str], client: Client
) -> None:
    alice, bob = (Client(as_user(roles, name)) for name in producers)
    try:
        mine = alice.enqueue("r_ok", {})
        theirs = bob.enqueue("r_ok", {})
        their_many = bob.enqueue_many("r_ok", [{}, {}])
        assert conn.execute("SELECT array_agg(DISTINCT enqueued_by) FROM tasks WHERE id = ANY(%s)",
                            ([theirs, *their_many],)).fetchone() == ([producers[1]],)
        with pytest.raises(PermissionDenied, match=f"task {theirs} was enqueued by {producers[1]}"):
            alice.cancel([mine, theirs])
        assert client.get(mine).status == client.get(theirs).status == "queued"  # all or nothing
        res = jobq_cli("cancel", str(theirs), env={"JOBQ_DATABASE_URL": as_user(roles, producers[0])})
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert f"task {theirs} was enqueued by {producers[1]}" in res.stderr
        assert alice.cancel(mine) == {mine: "cancelled"}
        assert bob.cancel(theirs) == {theirs: "cancelled"}
        with pytest.raises(PermissionDenied, match="may retry only its own tasks"):
            alice.retry(theirs)
        assert alice.retry(mine) == {mine: "queued"}

        async def bob_async() -> None:  # the async client refuses the same way
            async with AsyncClient(as_user(roles, producers[1])) as b:
                with pytest.raises(PermissionDenied, match=f"task {mine} was enqueued by {producers[0]}"):
                    await b.cancel(mine)
                assert await b.retry(theirs) == {theirs: "queued"}

        asyncio.run(bob_async())
        assert client.get(mine).status == "queued"
        # Trusted roles (here the owner) act on every task, e.g. an operator's `jobq cancel`.
        assert client.cancel(their_many) == {i: "cancelled" for i in their_many}
    finally:
        alice.close()
        bob.close()
        conn.execute("DELETE FROM tasks WHERE type = 'r_ok'")


def test_selectors_reach_only_the_callers_tasks_and_only_the_owner_controls_queues(
    conn: psycopg.Connection[Any], roles: str, producers: tuple[str, str], client: Client, as_role: Any
) -> None:
    alice, bob = (Client(as_user(roles, name)) for name in producers)
    try:
        mine = alice.enqueue_many("r_ok", [{}, {}], labels=["acme"])
        theirs = bob.enqueue("r_ok", {}, labels=["acme"])
        # A producer's selector matches only what its role enqueued: bob's task under the same label
        # is neither cancelled nor an error (an operator's selector, below, reaches it).
        assert alice.cancel_where(label="acme") == dict.fromkeys(mine, "cancelled")
        assert client.get(theirs).status == "queued"
        assert bob.retry_where(label="acme") == {}
        assert alice.retry_where(label="acme", status="cancelled") == dict.fromkeys(mine, "queued")
        assert bob.prioritize(label="acme", priority=9) == [theirs]
        with pytest.raises(PermissionDenied, match="another role"):
            bob.prioritize(mine[0], priority=9)
        assert [client.get(i).priority for i in mine] == [0, 0]
        res = jobq_cli("cancel", "--label", "acme", env={"JOBQ_DATABASE_URL": as_user(roles, producers[1])})
        assert res.returncode == 0 and f"{theirs}: cancelled" in res.stdout and str(mine[0]) not in res.stdout
        # Queue control is the operator's: producers read the queues but may not pause or cap them.
        assert any(q.type == "r_ok" for q in alice.queues())
        with pytest.raises(PermissionDenied):
            alice.pause("r_ok")
        with pytest.raises(PermissionDenied):
            bob.cap("r_ok", 1)
        res = jobq_cli("queue", "pause", "r_ok", env={"JOBQ_DATABASE_URL": as_user(roles, producers[0])})
        assert res.returncode == 1 and "permission denied" in res.stderr.lower() and "Traceback" not in res.stderr
        for role in (DASHBOARD, WORKER):
            with pytest.raises(PermissionDenied):
                client.pause("r_ok", connection=as_role(role))
        with pytest.raises(PermissionDenied):
            client.cancel_where(label="acme", connection=as_role(DASHBOARD))
        assert conn.execute("SELECT count(*) FROM queues WHERE type = 'r_ok'").fetchone() == (0,)
        client.pause("r_ok")  # the schema owner may
        assert client.cancel_where(label="acme") == dict.fromkeys(mine, "cancelled")  # and reaches every role's
    finally:
        alice.close()
        bob.close()
        conn.execute("DELETE FROM tasks WHERE type = 'r_ok'")
        conn.execute("DELETE FROM queues WHERE type = 'r_ok'")


def test_chunks_and_documents_of_another_role_are_out_of_reach(
    conn: psycopg.Connection[Any], roles: str, producers: tuple[str, str]
) -> None:
    alice, bob = producers
    docs = {}
    for who in producers:
        row = conn.execute(
            "INSERT INTO documents (name, size, format, kind, parser, pages, content_digest, content, enqueued_by) "
            "VALUES ('d', 1, 'md', 'text', 'general', 1, %s, 'x', %s) RETURNING id", (who, who)).fetchone()
        assert row is not None
        docs[who] = row[0]
        task = _finished(conn, "done", who, doc_id=docs[who], from_page=0, to_page=0)
        conn.execute("INSERT INTO chunks (doc_id, task_id, position, from_page, to_page, text, token_count, digest) "
                     "VALUES (%s, %s, 0, 0, 0, 'secret of ' || %s, 3, 'x')", (docs[who], task, who))
    try:
        with psycopg.connect(as_user(roles, alice), autocommit=True) as a:
            denied(a, "SELECT text FROM chunks")
            denied(a, "UPDATE chunks SET text = '' WHERE doc_id = %s", docs[bob])
            denied(a, "DELETE FROM chunks WHERE doc_id = %s", docs[bob])
            assert a.execute("SELECT text FROM own_chunks").fetchall() == [(f"secret of {alice}",)]
            denied(a, "SELECT replace_document_run(%s, '{}'::bigint[])", docs[bob])
            denied(a, "UPDATE documents SET content = '' WHERE id = %s", docs[bob])
            denied(a, "UPDATE documents SET enqueued_by = %s WHERE id = %s", alice, docs[bob])
            their_task = conn.execute("SELECT id FROM tasks WHERE doc_id = %s", (docs[bob],)).fetchone()
            assert their_task is not None
            denied(a, "SELECT * FROM reuse_task(%s, NULL, 0, NULL, 'x')", their_task[0])
            # No task into bob's document (it would write bob's chunks): to alice it does not exist.
            with pytest.raises(InvalidPayload, match=f"doc_id {docs[bob]} is not a document enqueued by role {alice}"):
                Client(as_user(roles, alice)).enqueue("r_ok", {}, doc_id=docs[bob], connection=a)
            with pytest.raises(errors.ForeignKeyViolation):
                a.execute("INSERT INTO tasks (type, doc_id) VALUES ('r_ok', %s)", (docs[bob],))
            assert a.execute("INSERT INTO tasks (type, doc_id) VALUES ('r_ok', %s)", (docs[alice],)).rowcount == 1
            # Its own document: replacing the finished run deletes its chunks, and nothing of bob's.
            a.execute("SELECT replace_document_run(%s, '{}'::bigint[])", (docs[alice],))
        left = conn.execute("SELECT text FROM chunks ORDER BY id").fetchall()
        assert left == [(f"secret of {bob}",)]
    finally:
        conn.execute("DELETE FROM documents WHERE id = ANY(%s)", (list(docs.values()),))


def test_document_pipeline_enqueues_and_reuses_as_a_producer(
    conn: psycopg.Connection[Any], roles: str, producers: tuple[str, str], tmp_path: Path
) -> None:
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\n" + "Plain words in a paragraph.\n\n" * 40)
    url = as_user(roles, producers[0])
    first = enqueue_files([str(doc)], url=url).files[0]
    assert first.ok, first.error
    # As a worker would leave it: done, with a chunk.
    conn.execute("UPDATE tasks SET status = 'done', progress = 1, finished_at = now() WHERE doc_id = %s",
                 (first.doc_id,))
    conn.execute("INSERT INTO chunks (doc_id, task_id, position, from_page, to_page, text, token_count, digest) "
                 "VALUES (%s, %s, 0, 0, 0, 'words', 2, 'x')", (first.doc_id, first.tasks[0]))
    again = enqueue_files([str(doc)], url=url).files[0]  # unchanged: reuses through reuse_task()
    assert again.ok, again.error
    assert again.doc_id == first.doc_id and again.reused == len(first.tasks) == len(again.tasks)
    rows = conn.execute("SELECT t.id, t.enqueued_by, t.status FROM chunks k JOIN tasks t ON t.id = k.task_id "
                        "WHERE k.doc_id = %s", (first.doc_id,)).fetchall()
    assert rows == [(again.tasks[0], producers[0], "done")]
    conn.execute("DELETE FROM documents WHERE id = %s", (first.doc_id,))


def test_worker_role_runs_a_real_worker(conn: psycopg.Connection[Any], roles: str, client: Client) -> None:
    for rel in relations(conn):
        assert not granted(conn, WORKER, rel) & {"TRUNCATE", "REFERENCES", "TRIGGER"}, rel
    assert "INSERT" not in granted(conn, WORKER, "tasks")
    login = f"jobq_t_worker_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {login} LOGIN IN ROLE {WORKER}")  # what docs/dashboards.md tells users
    try:
        ids = client.enqueue_many("r_ok", [{}] * 5)
        with BackgroundWorker(["r_ok"], url=as_user(roles, login), poll_seconds=0.2, heartbeat_seconds=0.2):
            wait_for(lambda: all(client.get(i).status == "done" for i in ids))
        row = conn.execute("SELECT done, stopped_at IS NOT NULL FROM workers").fetchone()
        assert row == (5, True)
        with psycopg.connect(as_user(roles, login), autocommit=True) as w:
            denied(w, "INSERT INTO tasks (type) VALUES ('r_ok')")
            denied(w, "TRUNCATE tasks")
            denied(w, "UPDATE queues SET paused = true")
            denied(w, "CREATE TABLE evil (x int)")
            with pytest.raises(errors.InsufficientPrivilege):
                w.execute("DROP TABLE workers")
            # Retention runs in the workers: it may delete finished tasks.
            assert w.execute("DELETE FROM tasks WHERE id = %s", (ids[0],)).rowcount == 1
    finally:
        conn.execute("DELETE FROM tasks WHERE type = 'r_ok'")
        conn.execute(f"DROP ROLE {login}")


def test_password_from_env_stores_a_scram_verifier(conn: psycopg.Connection[Any], roles: str) -> None:
    res = jobq_cli("roles", "--password-from-env", env={"JOBQ_DASHBOARD_PASSWORD": "s3cret-dash"})
    assert res.returncode == 0, res.stderr
    try:
        row = conn.execute(
            "SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = %s", (DASHBOARD,)
        ).fetchone()
        assert row is not None and row[0] is True
        stored: str = row[1]
        assert stored.startswith("SCRAM-SHA-256$") and "s3cret" not in stored
        # Recompute with the stored salt: equal only if the verifier is the one PostgreSQL itself would make.
        iterations, salt = stored.split("$")[1].split(":")
        assert (
            scram_verifier("s3cret-dash", salt=base64.b64decode(salt), iterations=int(iterations)) == stored
        )
        assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (WORKER,)).fetchone() == (
            False,
        )
        # And the server agrees: its own hash of the same password with the same salt matches.
        conn.execute("CREATE ROLE jobq_t_scram_probe NOLOGIN")
        try:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute("ALTER ROLE jobq_t_scram_probe PASSWORD 's3cret-dash'")
            theirs = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = 'jobq_t_scram_probe'"
            ).fetchone()
            assert theirs is not None
            t_iter, t_salt = theirs[0].split("$")[1].split(":")
            assert (
                scram_verifier("s3cret-dash", salt=base64.b64decode(t_salt), iterations=int(t_iter))
                == theirs[0]
            )
        finally:
            conn.execute("DROP ROLE jobq_t_scram_probe")
    finally:
        conn.execute(f"ALTER ROLE {DASHBOARD} NOLOGIN PASSWORD NULL")


def test_print_sql_and_missing_password(roles: str) -> None:
    res = jobq_cli("roles", "--print-sql")
    assert res.returncode == 0, res.stderr
    assert f"GRANT SELECT ON ALL TABLES IN SCHEMA {SCHEMA} TO {DASHBOARD};" in res.stdout
    assert "DELETE" in res.stdout and "CREATE ROLE" in res.stdout
    res = jobq_cli(
        "roles",
        "--password-from-env",
        env={"JOBQ_DASHBOARD_PASSWORD": "", "JOBQ_PRODUCER_PASSWORD": "", "JOBQ_WORKER_PASSWORD": ""},
    )
    assert res.returncode == 1 and "JOBQ_DASHBOARD_PASSWORD" in res.stderr and "Traceback" not in res.stderr


def test_producer_enqueues_with_a_trace_context(conn: psycopg.Connection[Any], as_role: Any, db_url: str) -> None:
    """The trace context (jobq[otel]) is an enqueue column: a producer writes it on every enqueue path."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    prod = as_role(PRODUCER)
    client = Client(db_url)
    span = NonRecordingSpan(SpanContext(trace_id=0x5CE0E9A56015FEC5AADFA328AE398115, span_id=0xAB54A98CEB1F0AD2,
                                        is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    try:
        with trace.use_span(span):
            ids = [client.enqueue("r_ok", {}, connection=prod), *client.enqueue_many("r_ok", [{}, {}], connection=prod),
                   client.enqueue("r_ok", {}, dedupe_key=f"k-{uuid.uuid4()}", connection=prod)]
    finally:
        client.close()
    parents = {r[0] for r in conn.execute("SELECT trace_context->>'traceparent' FROM tasks WHERE id = ANY(%s)",
                                          (ids,))}
    assert parents == {"00-5ce0e9a56015fec5aadfa328ae398115-ab54a98ceb1f0ad2-01"}
    conn.execute("DELETE FROM tasks WHERE id = ANY(%s)", (ids,))
