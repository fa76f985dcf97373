"""Least-privilege roles: jobq_dashboard, jobq_producer and jobq_worker (what `jobq roles` runs).

Roles are cluster-wide objects while a migration runs inside one database (and, often, as a user
that may not create roles), so they are made by a command an administrator runs, not by a
migration. The run is idempotent: it creates what is missing, then revokes and re-grants every
privilege in jobq's schema, so the roles are exactly what is written here after each run (run it
again after `jobq migrate` so new tables and columns are covered).

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
from dataclasses import dataclass
from typing import Any

import psycopg

from jobqueue.db.queries import AdminSQL

KINDS = ("dashboard", "producer", "worker")
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


@dataclass(frozen=True)
class Grant:
    """Table-level privileges on the relations that exist (an older revision lacks some)."""

    privileges: tuple[str, ...]
    tables: tuple[str, ...]


@dataclass(frozen=True)
class ColumnGrant:
    """One privilege on some columns of a table: `only` those (None: all) minus `never`."""

    privilege: str
    table: str
    never: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None


# What only the runtime writes on a task, and who enqueued a row (set by the database).
RUNTIME_COLUMNS = ("worker_id", "attempt", "lease_expires_at", "started_at", "result", "last_error",
                   "retry_count", "process_duration", "cancel_requested_at", "has_dependents")
DATABASE_COLUMNS = ("id", "enqueued_by", "created_at")

TABLES: dict[str, tuple[Grant, ...]] = {
    "dashboard": (),  # SELECT on everything, below; a read-only default transaction
    # Reads tasks and documents; its own chunks through the own_chunks view (none on chunks itself).
    # Every role reads alembic_version: the CLI checks the schema's revision before it acts.
    "producer": (
        Grant(("SELECT",), ("tasks", "documents", "queues", "queue_state", "document_progress", "batch_progress",
                            "document_tasks", "own_chunks", "alembic_version", "flow_control", "schedules",
                            "schedules_due")),
        Grant(("SELECT", "INSERT", "UPDATE"), ("batches",)),
    ),
    # Claim, heartbeat, progress, complete, rescue (select/update tasks, upsert workers). DELETE on
    # tasks and workers is the retention pass the workers run. Document handlers read documents and
    # write chunks (raptor replaces its summary levels).
    "worker": (
        Grant(("SELECT", "UPDATE", "DELETE"), ("tasks",)),
        Grant(("SELECT", "INSERT", "UPDATE", "DELETE"), ("workers", "chunks")),
        Grant(("SELECT",), ("queues", "documents", "batches", "alembic_version")),
        # Flow control (0009): the rate windows the claim reads, appends to and prunes.
        Grant(("SELECT", "INSERT", "DELETE"), ("flow_grants",)),
        Grant(("SELECT",), ("flow_rules", "flow_control")),
        # Cron: the worker declares its types' schedules and moves them on; it enqueues their ticks
        # only through fire_ticks (migration 0010), never by INSERT on tasks.
        Grant(("SELECT", "INSERT", "UPDATE"), ("schedules",)),
    ),
}

COLUMNS: dict[str, tuple[ColumnGrant, ...]] = {
    "dashboard": (),
    "producer": (
        # Enqueue (INSERT and COPY) writes the enqueue columns; the insert guard of 0005 keeps the
        # status to waiting, queued or cancelled. `id` is there for enqueue_many's preallocated ids.
        # `schedule` and `tick` are the scheduler's (a forged pair would take a cron tick's place).
        ColumnGrant("INSERT", "tasks", never=(*RUNTIME_COLUMNS, "enqueued_by", "created_at", "schedule", "tick")),
        # Enqueue with depends_on marks the parents (never unmarks them: a trigger of 0005).
        ColumnGrant("UPDATE", "tasks", only=("has_dependents",)),
        ColumnGrant("INSERT", "documents", never=DATABASE_COLUMNS),
        ColumnGrant("UPDATE", "documents", never=DATABASE_COLUMNS),
    ),
    "worker": (),
}

# The producer's only other ways to change tasks and chunks (each checks the caller's ownership).
FUNCTIONS: dict[str, tuple[str, ...]] = {
    "dashboard": (),
    "producer": ("cancel_tasks", "retry_tasks", "reuse_task", "replace_document_run",
                 # by selector (migration 0008): the same rules, over the tasks the selector matches
                 "cancel_where", "retry_where", "prioritize_tasks"),
    # A worker stores its types' flow declarations and gets their key index (0009), and enqueues
    # cron ticks only through fire_ticks (0010).
    "worker": ("declare_flow", "fire_ticks"),
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


def _texts(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...]) -> list[str]:
    """The statements a generating statement of admin.sql returns (none when it returns no row)."""
    with psycopg.RawCursor(conn) as cur:
        cur.execute(sql, params)
        return [str(r[0]) for r in cur.fetchall() if r[0] is not None]


def _checked(privileges: tuple[str, ...]) -> list[str]:
    bad = [p for p in privileges if p not in PRIVILEGES]
    if bad:
        raise ValueError(f"unknown privilege(s) {bad}")
    return list(privileges)


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
            for g in TABLES[kind]:
                out += _texts(conn, q.grant_tables, (schema, role, _checked(g.privileges), list(g.tables)))
            for c in COLUMNS[kind]:
                _checked((c.privilege,))
                only = None if c.only is None else list(c.only)
                out += _texts(conn, q.grant_columns, (schema, role, c.privilege, c.table, list(c.never), only))
            # Identity columns and enqueue_many's nextval('tasks_id_seq').
            out += _texts(conn, q.grant_all_tables, (schema, role, "USAGE"))
            out += _texts(conn, q.grant_functions, (schema, role, list(FUNCTIONS[kind])))
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
