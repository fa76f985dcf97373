"""Migrations: up from empty, idempotent, safe under concurrent `jobq migrate`, plain alembic works."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from support import REPO, SCHEMA, create_database, drop_database, jobq_cli

from jobqueue.admin.migrate import current, migrate


def _head() -> str:
    from alembic.script import ScriptDirectory

    from jobqueue.admin.migrate import alembic_config

    return str(ScriptDirectory.from_config(alembic_config("postgresql://x@/y")).get_current_head())


def test_up_from_empty_and_idempotent(server_url: str) -> None:
    url = create_database(server_url)
    try:
        assert current(url) is None
        migrate(url)
        assert current(url) == _head()
        migrate(url)  # a second run is a no-op
        assert current(url) == _head()
        with psycopg.connect(url) as conn:
            tables = {r[0] for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (SCHEMA,))}
        assert {"tasks", "workers", "queues", "alembic_version"} <= tables
    finally:
        drop_database(server_url, url)


def test_four_concurrent_migrate_processes(server_url: str) -> None:
    url = create_database(server_url)
    try:
        env = {**os.environ, "JOBQ_DATABASE_URL": url}

        def run(_: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "jobqueue", "migrate"], env=env, capture_output=True,
                                  text=True, timeout=120, cwd=REPO)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, range(4)))
        for r in results:
            assert r.returncode == 0, r.stderr
        assert current(url) == _head()
    finally:
        drop_database(server_url, url)


def test_plain_alembic_upgrade_head(server_url: str) -> None:
    url = create_database(server_url)
    try:
        env = {**os.environ, "JOBQ_DATABASE_URL": url}
        r = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], env=env, capture_output=True,
                           text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert current(url) == _head()
    finally:
        drop_database(server_url, url)


def test_custom_schema(server_url: str) -> None:
    url = create_database(server_url)
    try:
        migrate(url, schema="myq")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('myq.tasks')").fetchone() == ("myq.tasks",)
            assert conn.execute("SELECT to_regclass('tasks')").fetchone() == (None,)
        r = jobq_cli("migrate", env={"JOBQ_DATABASE_URL": url, "JOBQ_SCHEMA": "myq"})
        assert r.returncode == 0, r.stderr
    finally:
        drop_database(server_url, url)


def test_0004_backfills_requeue_reason_and_goes_down_and_up(server_url: str) -> None:
    """Rows rescued before 0004 keep counting as 'worker lost' in the views (backfilled from the
    rescuer's message once, at upgrade); the revision goes down and up again cleanly."""
    from alembic import command

    from jobqueue.admin.migrate import alembic_config

    url = create_database(server_url)
    try:
        migrate(url, revision="0003")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO tasks (type, status, retry_count, last_error, finished_at) VALUES "
                         "('m', 'failed', 1, 'worker h:1:abc lost (lease expired)', now()), "
                         "('m', 'failed', 1, 'ValueError: bad', now())")
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            reasons = conn.execute("SELECT last_error, requeue_reason FROM tasks ORDER BY id").fetchall()
            assert [r[1] for r in reasons] == ["lost", None]
            errors = {r[0] for r in conn.execute("SELECT error FROM failures")}
            assert errors == {"worker lost (lease expired)", "ValueError: bad"}
        command.downgrade(alembic_config(url), "0003")
        assert current(url) == "0003"
        migrate(url)
        assert current(url) == _head()
    finally:
        drop_database(server_url, url)


def test_0006_abandoned_column_goes_down_and_up_keeping_grants(server_url: str) -> None:
    """worker_health gains `abandoned` in place; going down drops the column and re-creates the view,
    and a role's grant on the view survives both ways."""
    import uuid

    from alembic import command

    from jobqueue.admin.migrate import alembic_config

    url = create_database(server_url)
    role = f"jobq_m6_{uuid.uuid4().hex[:6]}"

    def state() -> tuple[bool, bool]:
        with psycopg.connect(url) as conn:
            has_column = conn.execute(
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = 'worker_health' AND column_name = 'abandoned'", (SCHEMA,)).fetchone()
            granted = conn.execute("SELECT has_table_privilege(%s, %s, 'SELECT')",
                                   (role, f'"{SCHEMA}".worker_health')).fetchone()
        assert has_column is not None and granted is not None
        return bool(has_column[0]), bool(granted[0])

    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{role}"')
            conn.execute(f'GRANT SELECT ON "{SCHEMA}".worker_health TO "{role}"')
        assert state() == (True, True)
        command.downgrade(alembic_config(url), "0005")
        assert state() == (False, True)
        migrate(url)
        assert current(url) == _head()
        assert state() == (True, True)
    finally:
        drop_database(server_url, url)
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_0013_flow_control_and_failures_read_by_index_and_go_down_and_up(server_url: str) -> None:
    """0009's flow_control scanned every task (its status IN (...) has no index); 0013's reads each
    rule's queued rows through the claim index and running ones through the lease index, and failures
    reads the errors through tasks_errors_idx, with the same rows out; down to 0012 and up again."""
    from alembic import command
    from test_views import explain, plan_nodes

    from jobqueue.admin.migrate import alembic_config

    url = create_database(server_url)

    def view(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
        return conn.execute("SELECT * FROM flow_control ORDER BY type, key").fetchall()

    def seq_scans(conn: psycopg.Connection[Any]) -> list[str]:
        plan = explain(conn, "SELECT * FROM flow_control")
        return [n["Relation Name"] for n in plan_nodes(plan) if n["Node Type"] == "Seq Scan"]

    def indexes(conn: psycopg.Connection[Any], view: str) -> set[str]:
        return {n.get("Index Name", "") for n in plan_nodes(explain(conn, f"SELECT * FROM {view}"))}

    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO flow_rules (type, key, max_per_key) VALUES ('m_fair', 'owner', 1)")
            conn.execute("INSERT INTO tasks (type, status, owner, finished_at) SELECT 'm_fair', 'done', "
                         "'t' || (i % 3), now() FROM generate_series(1, 50000) i")
            conn.execute("INSERT INTO tasks (type, status, owner) SELECT 'm_fair', 'queued', 't' || (i % 3) "
                         "FROM generate_series(1, 30) i")
            conn.execute("INSERT INTO tasks (type, status, owner, worker_id, attempt, started_at, lease_expires_at) "
                         "VALUES ('m_fair', 'running', 't1', 'w', 1, now(), now() + interval '1 minute')")
            conn.execute("INSERT INTO tasks (type, status, last_error, finished_at) SELECT 'm_fair', 'failed', "
                         "'ValueError: ' || i, now() FROM generate_series(1, 40) i")
            conn.execute("ANALYZE tasks")
            conn.execute("ANALYZE flow_rules")
            now, failures = view(conn), conn.execute("SELECT type, error, failed FROM failures").fetchall()
            assert [(r[1], r[3], r[4]) for r in now] == [("t0", 10, 0), ("t1", 10, 1), ("t2", 10, 0)]
            assert failures == [("m_fair", "ValueError: N", 40)]
            assert "tasks" not in seq_scans(conn) and "tasks_errors_idx" in indexes(conn, "failures")
            command.downgrade(alembic_config(url), "0012")
            assert view(conn) == now and "tasks" in seq_scans(conn)
            assert "tasks_errors_idx" not in indexes(conn, "failures")
            migrate(url)
            assert current(url) == _head() and view(conn) == now and "tasks" not in seq_scans(conn)
            assert conn.execute("SELECT type, error, failed FROM failures").fetchall() == failures
    finally:
        drop_database(server_url, url)


def test_0014_type_and_payload_checks_refuse_what_they_refused_and_go_down_and_up(server_url: str) -> None:
    """0014 rewrote tasks_type_check without a bounded repetition and moved tasks_payload_check to a
    trigger: the same types are accepted at 0013 and at head, an oversized payload is refused on insert
    and on update with the same SQLSTATE and constraint name, and an update of other columns of a row
    whose payload is over the limit (written while the check was off) is no longer re-checked."""
    from alembic import command

    from jobqueue.admin.migrate import alembic_config

    types = ["a", "x" * 48, "x" * 49, "", "a.b:c-d_E9", "a b", "é", "a\n", "a$", "\uff21", "a/b"]
    big = '{"k": "' + "x" * 2097152 + '"}'

    def accepted(conn: psycopg.Connection[Any]) -> list[bool]:
        out = []
        for t in types:
            try:
                with conn.transaction(force_rollback=True):
                    conn.execute("INSERT INTO tasks (type) VALUES (%s)", (t,))
                out.append(True)
            except psycopg.errors.CheckViolation as exc:
                assert exc.diag.constraint_name == "tasks_type_check"
                out.append(False)
        return out

    def refused_payload(conn: psycopg.Connection[Any], sql: str) -> tuple[str | None, str | None]:
        try:
            with conn.transaction(force_rollback=True):
                conn.execute(sql, (big,))
        except psycopg.errors.CheckViolation as exc:
            return exc.diag.constraint_name, str(exc).splitlines()[0]
        return None, None

    url = create_database(server_url)
    try:
        migrate(url, revision="0013")
        with psycopg.connect(url, autocommit=True) as conn:
            before = accepted(conn)
            assert before == [True, True, False, False, True, False, False, False, False, False, False]
            insert_before = refused_payload(conn, "INSERT INTO tasks (type, payload) VALUES ('m', %s::jsonb)")
            migrate(url)
            assert accepted(conn) == before
            assert refused_payload(conn, "INSERT INTO tasks (type, payload) VALUES ('m', %s::jsonb)") == insert_before
            assert insert_before[0] == "tasks_payload_check"
            tid = conn.execute("INSERT INTO tasks (type) VALUES ('m') RETURNING id").fetchone()[0]  # type: ignore[index]
            assert refused_payload(conn, f"UPDATE tasks SET payload = %s::jsonb WHERE id = {tid}") == insert_before
            with conn.transaction():
                conn.execute("ALTER TABLE tasks DISABLE TRIGGER tasks_payload_check")
                conn.execute("UPDATE tasks SET payload = %s::jsonb WHERE id = %s", (big, tid))
                conn.execute("ALTER TABLE tasks ENABLE TRIGGER tasks_payload_check")
            conn.execute("UPDATE tasks SET priority = 5 WHERE id = %s", (tid,))  # not re-checked
            conn.execute("DELETE FROM tasks WHERE id = %s", (tid,))
            command.downgrade(alembic_config(url), "0013")
            assert accepted(conn) == before
            assert refused_payload(conn, "INSERT INTO tasks (type, payload) VALUES ('m', %s::jsonb)") == insert_before
            migrate(url)
            assert current(url) == _head() and accepted(conn) == before
    finally:
        drop_database(server_url, url)


def test_append_log_inlined_same_results_and_goes_down_and_up(server_url: str) -> None:
    """0001's append_log ran as a function call per row (its sub-SELECT kept the planner from inlining
    it); the inlinable one is folded into the statement and gives the same logs; down and up again."""
    from alembic import command
    from alembic.script import ScriptDirectory

    from jobqueue.admin.migrate import alembic_config

    url = create_database(server_url)
    # Found by file, not by id: the revision may be renumbered when branches are merged.
    script = ScriptDirectory.from_config(alembic_config(url))
    mine = next(r for r in script.walk_revisions() if (r.path or "").endswith("_append_log_inline.py"))
    grid = ("SELECT l.log, n.lines, m, append_log(l.log, n.lines, m) FROM (VALUES (''), ('a'), ('abc'), "
            "(E'ab\\ncd'), (E'one\\ntwo\\nthree'), (repeat('x', 30)), (E'\\n\\n')) l(log) "
            "CROSS JOIN (VALUES (''), (NULL), ('z'), (E'y\\nz'), (repeat('q', 12)), (E'\\nw')) n(lines) "
            "CROSS JOIN generate_series(0, 40) m ORDER BY 1, 2, 3")

    def called(conn: psycopg.Connection[Any]) -> bool:
        rows = conn.execute("EXPLAIN (VERBOSE) SELECT append_log(progress_msg, 'Done.', 4000) FROM tasks")
        return "append_log" in " ".join(r[0] for r in rows)

    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            now = conn.execute(grid).fetchall()
            assert ("abc", "z", 3, "z") in now and (f"{'x' * 30}", "z", 40, f"{'x' * 30}\nz") in now
            assert not called(conn)
            command.downgrade(alembic_config(url), mine.down_revision)
            assert called(conn) and conn.execute(grid).fetchall() == now
            migrate(url)
            assert current(url) == _head() and not called(conn) and conn.execute(grid).fetchall() == now
    finally:
        drop_database(server_url, url)
