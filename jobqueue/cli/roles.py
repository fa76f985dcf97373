"""Least-privilege roles: `jobq roles`.

Roles are cluster-wide objects while a migration runs inside one database (and, often, as a user
that may not create roles), so they are made by a command an administrator runs, not by a
migration. The command is idempotent: it creates what is missing, then revokes and re-grants
every privilege in jobq's schema, so the roles are exactly what is written here after each run
(run it again after `jobq migrate` so new tables are covered).

By default the roles are NOLOGIN group roles: people and services log in as their own users made
members of them (see docs/dashboards.md). With --password-from-env a role whose
JOBQ_<ROLE>_PASSWORD variable is set can log in itself; the password is sent as a SCRAM-SHA-256
verifier computed here, so the plain text never reaches the server or its statement log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
import typer
from psycopg import sql

KINDS = ("dashboard", "producer", "worker")


@dataclass(frozen=True)
class Grant:
    privileges: str
    tables: tuple[str, ...]


# What each role may do, table by table. A table missing from the schema (an older revision) is skipped.
GRANTS: dict[str, tuple[Grant, ...]] = {
    # Reads everything jobq stores, views included; writes nothing (it also defaults to read-only
    # transactions when it logs in itself).
    "dashboard": (),
    # Enqueue (insert), read, cancel and retry (update) tasks; enqueue documents. No delete.
    "producer": (
        Grant("SELECT, INSERT, UPDATE", ("tasks", "documents", "batches")),
        Grant("SELECT, UPDATE", ("chunks",)),
        Grant("SELECT", ("queues", "document_progress", "batch_progress")),
    ),
    # Claim, heartbeat, progress, complete, rescue (select/update tasks, upsert workers). DELETE on
    # tasks and workers is the retention pass the workers run (jobqueue/maintenance/pruner.py).
    # Document handlers read documents and write chunks (raptor replaces its summary levels).
    "worker": (
        Grant("SELECT, UPDATE, DELETE", ("tasks",)),
        Grant("SELECT, INSERT, UPDATE, DELETE", ("workers", "chunks")),
        Grant("SELECT", ("queues", "documents", "batches")),
    ),
}


def role_name(prefix: str, kind: str) -> str:
    return f"{prefix}_{kind}"


def password_env(kind: str) -> str:
    return f"JOBQ_{kind.upper()}_PASSWORD"


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """PostgreSQL's stored form of a SCRAM-SHA-256 password (RFC 5802/7677), as the server computes it."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _existing(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'v', 'm', 'p') "
        "UNION SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s",
        (schema, schema),
    ).fetchall()
    return {r[0] for r in rows}


def statements(
    conn: psycopg.Connection[Any], schema: str, prefix: str, passwords: dict[str, str] | None = None
) -> list[sql.Composed]:
    """Every statement `jobq roles` runs, in order (passwords, if any, as SCRAM verifiers)."""
    passwords = passwords or {}
    have = _existing(conn, schema)
    s = sql.Identifier(schema)
    out: list[sql.Composed] = []
    for kind in KINDS:
        role = sql.Identifier(role_name(prefix, kind))
        # Concurrent runs (two databases on one cluster) race on the shared catalog: either error
        # means the role exists now.
        out.append(
            sql.SQL(
                "DO $$ BEGIN CREATE ROLE {} NOLOGIN; "
                "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            ).format(role)
        )
        out.append(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, role))
        out.append(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(s, role))
        out.append(sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(s, role))
        out.append(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, role))
        if kind == "dashboard":
            out.append(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, role))
            out.append(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(role))
        else:
            for g in GRANTS[kind]:
                tables = [t for t in g.tables if t in have]
                if tables:
                    out.append(
                        sql.SQL("GRANT {} ON {} TO {}").format(
                            sql.SQL(g.privileges),
                            sql.SQL(", ").join(sql.Identifier(schema, t) for t in tables),
                            role,
                        )
                    )
            # Identity columns and enqueue_many's nextval('tasks_id_seq').
            out.append(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, role))
            if kind == "producer" and "replace_document_run" in have:
                # Re-enqueueing a document replaces its finished run; the function is the producer's
                # only way to delete anything.
                out.append(sql.SQL("GRANT EXECUTE ON FUNCTION {}.replace_document_run(bigint, bigint[]) TO {}")
                           .format(s, role))
        if kind in passwords:
            out.append(
                sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
                    role, sql.Literal(scram_verifier(passwords[kind]))
                )
            )
    return out


def apply(
    conn: psycopg.Connection[Any], schema: str, prefix: str, passwords: dict[str, str] | None = None
) -> list[str]:
    """Create and grant the roles in one transaction; returns the role names."""
    with conn.transaction():
        for stmt in statements(conn, schema, prefix, passwords):
            conn.execute(stmt)
    return [role_name(prefix, k) for k in KINDS]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""

    @app.command()
    def roles(
        password_from_env: Annotated[
            bool,
            typer.Option(
                "--password-from-env",
                help="Let a role log in with the password in JOBQ_DASHBOARD_PASSWORD, JOBQ_PRODUCER_PASSWORD "
                "or JOBQ_WORKER_PASSWORD (roles whose variable is unset stay as they are).",
            ),
        ] = False,
        prefix: Annotated[
            str | None,
            typer.Option(
                help="Role name prefix (default: the schema name, giving jobq_dashboard etc.)."
            ),
        ] = None,
        print_sql: Annotated[
            bool,
            typer.Option(
                "--print-sql", help="Print the statements instead of running them (passwords elided)."
            ),
        ] = False,
    ) -> None:
        """Create the jobq_dashboard (read-only), jobq_producer and jobq_worker roles and grant them."""
        import re

        from jobqueue.cli.app import ensure_schema, fail, out
        from jobqueue.db.connect import connect, resolve_url
        from jobqueue.settings import get_settings

        settings = get_settings()
        prefix = prefix or settings.schema_name
        if not re.match(r"^[a-z_][a-z0-9_]{0,40}$", prefix):
            fail(f"--prefix must be a lower-case SQL identifier, got {prefix!r}")
        passwords: dict[str, str] = {}
        if password_from_env:
            passwords = {k: os.environ[password_env(k)] for k in KINDS if os.environ.get(password_env(k))}
            if not passwords:
                fail("--password-from-env: none of " + ", ".join(password_env(k) for k in KINDS) + " is set")
        ensure_schema()
        with connect(resolve_url(settings), autocommit=True) as conn:
            if print_sql:
                shown = {k: "<password>" for k in passwords}
                for stmt in statements(conn, settings.schema_name, prefix, shown):
                    text = stmt.as_string(conn)
                    if "LOGIN PASSWORD" in text:
                        text = text.rsplit(" PASSWORD ", 1)[0] + " PASSWORD '<SCRAM verifier>'"
                    print(text + ";")
                return
            names = apply(conn, settings.schema_name, prefix, passwords)
        for kind, name in zip(KINDS, names, strict=True):
            login = "login with password" if kind in passwords else "group role (NOLOGIN unless set before)"
            out.print(f"{name}: {login}")
