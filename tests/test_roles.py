"""`jobq roles`: what jobq_dashboard, jobq_producer and jobq_worker can and cannot do.

The roles are created by the real command; each check then runs as the role (SET ROLE on a
superuser connection, or a login user made a member of the role, exactly as the docs tell users to).
Every "cannot" is asserted on the specific permission error, so a missing table or a typo cannot
pass for a refusal.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import errors
from support import SCHEMA, BackgroundWorker, jobq_cli, wait_for

from jobqueue import Client, Context, task
from jobqueue.admin.roles import scram_verifier

PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


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
    assert "jobq_dashboard" in res.stdout and "jobq_worker" in res.stdout
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
        "WHERE n.nspname = 'jobq' AND c.relkind IN ('r', 'v')"
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
        assert granted(conn, "jobq_dashboard", rel) == {"SELECT"}, rel

    conn.execute("INSERT INTO tasks (type) VALUES ('r_seen')")
    dash = as_role("jobq_dashboard")
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
        "WHERE r.rolname = 'jobq_dashboard' AND s.setdatabase = 0"
    ).fetchone()
    assert settings is not None and "default_transaction_read_only=on" in settings[0]


def test_producer_enqueues_reads_cancels_but_never_deletes(
    conn: psycopg.Connection[Any], as_role: Any, db_url: str
) -> None:
    for rel in relations(conn):
        assert not granted(conn, "jobq_producer", rel) & {"DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}, rel
    assert granted(conn, "jobq_producer", "workers") == set()
    prod = as_role("jobq_producer")
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
    # Its one way to delete: replacing a re-enqueued document's finished run.
    prod.execute("SELECT replace_document_run(-1, '{}'::bigint[])")
    dash = as_role("jobq_dashboard")
    denied(dash, "SELECT replace_document_run(-1, '{}'::bigint[])")
    denied(prod, "TRUNCATE tasks")
    denied(prod, "INSERT INTO workers (id, host, pid, types, concurrency) VALUES ('x', 'h', 1, '{}', 1)")
    denied(prod, "UPDATE queues SET paused = true")
    denied(prod, "CREATE TABLE evil (x int)")
    with pytest.raises(errors.InsufficientPrivilege):
        prod.execute("ALTER TABLE tasks ADD COLUMN evil int")
    conn.execute("DELETE FROM tasks WHERE type = 'r_ok'")


def test_worker_role_runs_a_real_worker(conn: psycopg.Connection[Any], roles: str, client: Client) -> None:
    for rel in relations(conn):
        assert not granted(conn, "jobq_worker", rel) & {"TRUNCATE", "REFERENCES", "TRIGGER"}, rel
    assert "INSERT" not in granted(conn, "jobq_worker", "tasks")
    login = f"jobq_t_worker_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {login} LOGIN IN ROLE jobq_worker")  # what docs/dashboards.md tells users
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
            "SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = 'jobq_dashboard'"
        ).fetchone()
        assert row is not None and row[0] is True
        stored: str = row[1]
        assert stored.startswith("SCRAM-SHA-256$") and "s3cret" not in stored
        # Recompute with the stored salt: equal only if the verifier is the one PostgreSQL itself would make.
        iterations, salt = stored.split("$")[1].split(":")
        assert (
            scram_verifier("s3cret-dash", salt=base64.b64decode(salt), iterations=int(iterations)) == stored
        )
        assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'jobq_worker'").fetchone() == (
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
        conn.execute("ALTER ROLE jobq_dashboard NOLOGIN PASSWORD NULL")


def test_print_sql_and_missing_password(roles: str) -> None:
    res = jobq_cli("roles", "--print-sql")
    assert res.returncode == 0, res.stderr
    assert f"GRANT SELECT ON ALL TABLES IN SCHEMA {SCHEMA} TO {SCHEMA}_dashboard;" in res.stdout
    assert "DELETE" in res.stdout and "CREATE ROLE" in res.stdout
    res = jobq_cli(
        "roles",
        "--password-from-env",
        env={"JOBQ_DASHBOARD_PASSWORD": "", "JOBQ_PRODUCER_PASSWORD": "", "JOBQ_WORKER_PASSWORD": ""},
    )
    assert res.returncode == 1 and "JOBQ_DASHBOARD_PASSWORD" in res.stderr and "Traceback" not in res.stderr
