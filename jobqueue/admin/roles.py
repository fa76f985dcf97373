"""Least-privilege roles: jobq_dashboard, jobq_producer and jobq_worker (what `jobq roles` runs).

Roles are cluster-wide objects while a migration runs inside one database (and, often, as a user
that may not create roles), so they are made by a command an administrator runs, not by a
migration. The run is idempotent: it creates what is missing, then revokes and re-grants every
privilege in jobq's schema, so the roles are exactly what admin.sql's `role_grants` says after each
run (run it again after `jobq migrate` so new tables and columns are covered).

A producer enqueues with INSERT/COPY on the enqueue columns only and changes tasks only through the
SECURITY DEFINER functions of migration 0005 (cancel_tasks, retry_tasks, reuse_task,
replace_document_run), which act on the rows its role enqueued; docs/roles.md says what each role
can and cannot do and why.

By default the roles are NOLOGIN group roles: people and services log in as their own users made
members of them. With passwords, a role can log in itself; the password is sent as a SCRAM-SHA-256
verifier computed here, so the plain text never reaches the server or its statement log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any

import psycopg

from jobqueue.db.queries import AdminSQL

KINDS = ("dashboard", "producer", "worker")


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


def _texts(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...]) -> list[str]:
    """The statements a generating statement of admin.sql returns (none when it returns no row)."""
    with psycopg.RawCursor(conn) as cur:
        cur.execute(sql, params)
        return [str(r[0]) for r in cur.fetchall() if r[0] is not None]


def statements(
    conn: psycopg.Connection[Any], schema: str, prefix: str, passwords: dict[str, str] | None = None,
    *, show_passwords: bool = True,
) -> list[str]:
    """Every statement `jobq roles` runs, in order. Passwords become SCRAM verifiers, or a
    placeholder with show_passwords=False (for printing)."""
    passwords = passwords or {}
    q = AdminSQL.load(schema)
    out: list[str] = []
    for kind in KINDS:
        role = role_name(prefix, kind)
        out += _texts(conn, q.create_role, (role,))
        out += _texts(conn, q.reset_role, (schema, role))
        if kind == "dashboard":
            out += _texts(conn, q.grant_all_tables, (schema, role, "SELECT"))
            out += _texts(conn, q.read_only, (role,))
        else:
            # The policy itself is admin.sql's role_grants; each row becomes its GRANT statement(s).
            with psycopg.RawCursor(conn) as cur:
                policy = cur.execute(q.role_grants, (kind,)).fetchall()
            for _, obj, privileges, names, never, only in policy:
                if obj == "tables":
                    out += _texts(conn, q.grant_tables, (schema, role, privileges, names))
                elif obj == "columns":
                    out += _texts(conn, q.grant_columns, (schema, role, privileges[0], names[0], never, only))
                else:
                    out += _texts(conn, q.grant_functions, (schema, role, names))
            # Identity columns and enqueue_many's nextval('tasks_id_seq').
            out += _texts(conn, q.grant_all_tables, (schema, role, "USAGE"))
        if kind in passwords:
            verifier = scram_verifier(passwords[kind]) if show_passwords else "<SCRAM verifier>"
            out += _texts(conn, q.login_password, (role, verifier))
    return out


def apply(
    conn: psycopg.Connection[Any], schema: str, prefix: str, passwords: dict[str, str] | None = None
) -> list[str]:
    """Create and grant the roles in one transaction; returns the role names."""
    with conn.transaction():
        for stmt in statements(conn, schema, prefix, passwords):
            conn.execute(stmt.encode())
    return [role_name(prefix, k) for k in KINDS]
