"""Which alembic revision this jobq needs, and whether a database's schema is at it, without alembic.

Importing alembic (and SQLAlchemy under it) costs most of a second, and every CLI command checks the
schema before it runs; `jobq ls` should not pay for a migration tool it does not run. The migration
files are the source of truth: each declares ``revision = "…"`` and ``down_revision = …`` at top level,
read here with :mod:`ast` (the files are not imported). The head is the one revision no other revision
names as its parent; a test compares it with alembic's own ScriptDirectory so the two cannot drift.
"""

from __future__ import annotations

import ast
import enum
import re
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobqueue.db.queries import SchemaSQL
from jobqueue.errors import ConfigurationError, SchemaMissing

if TYPE_CHECKING:
    import asyncpg
    import psycopg


def _versions_dir() -> Path:
    spec = find_spec("jobqueue.migrations")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError("jobq's migrations (jobqueue.migrations) are not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "versions"


# A top-level `revision = "…"` / `down_revision = …` line (annotated or not), as alembic writes them.
_ASSIGNED = re.compile(r"^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", re.M)


def _declared(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """(revision, parents) declared at the top level of one migration file, or None for other files.

    The two assignment lines are evaluated alone: parsing every migration file whole cost a read-only
    command about 10 ms. A value that is not one literal on its line is read from the parsed module."""
    text = path.read_text(encoding="utf-8")
    try:
        values: dict[str, Any] = {name: ast.literal_eval(value) for name, value in _ASSIGNED.findall(text)}
    except (ValueError, SyntaxError):
        values = _parsed(text, str(path))
    if not isinstance(values.get("revision"), str):
        return None
    down = values.get("down_revision")
    parents = () if down is None else (down,) if isinstance(down, str) else tuple(down)
    return values["revision"], parents


def _parsed(text: str, filename: str) -> dict[str, Any]:
    """The top-level revision and down_revision of a module, from its syntax tree."""
    values: dict[str, Any] = {}
    for node in ast.parse(text, filename).body:
        target: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            assert isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
            values[target.id] = ast.literal_eval(node.value)
    return values


@cache
def revisions() -> dict[str, tuple[str, ...]]:
    """Every known revision and its parents."""
    found: dict[str, tuple[str, ...]] = {}
    for path in sorted(_versions_dir().glob("*.py")):
        declared = _declared(path)
        if declared is not None:
            found[declared[0]] = declared[1]
    return found


@cache
def head_revision() -> str:
    """The single head of the migration chain (jobq's chain never branches)."""
    known = revisions()
    parents = {p for ps in known.values() for p in ps}
    heads = sorted(set(known) - parents)
    if len(heads) != 1:
        raise ConfigurationError(f"jobq's migrations should have one head, found {heads or 'none'}")
    return heads[0]


class SchemaState(enum.Enum):
    CURRENT = "current"  # at this jobq's head revision
    MISSING = "missing"  # no jobq tables in the schema
    BEHIND = "behind"  # an older revision of ours: `jobq migrate` upgrades it
    NEWER = "newer"  # a revision this jobq does not know: migrated by a newer jobq

    def raise_for(self, schema: str) -> None:
        """The one-line error telling the user what to do about this state (nothing when current)."""
        if self is SchemaState.MISSING:
            raise SchemaMissing(f'jobq\'s tables are not in schema "{schema}": run `jobq migrate` first')
        if self is SchemaState.BEHIND:
            raise SchemaMissing(f'schema "{schema}" is at an older revision than this jobq needs '
                                f"({head_revision()}): run `jobq migrate`")
        if self is SchemaState.NEWER:
            raise SchemaMissing(f'schema "{schema}" was migrated by a newer jobq (revision unknown here): '
                                "upgrade jobq")


def stamped(conn: psycopg.Connection[Any], schema: str) -> tuple[bool, set[str]]:
    """Whether jobq's tasks table exists in `schema`, and the alembic revisions stamped there."""
    import psycopg

    q = SchemaSQL.load(schema)
    with psycopg.RawCursor(conn) as cur:
        row = cur.execute(q.tables).fetchone()
        assert row is not None
        has_tasks, versioned = row
        return bool(has_tasks), ({r[0] for r in cur.execute(q.revision).fetchall()} if versioned else set())


async def astamped(conn: asyncpg.Connection, schema: str) -> tuple[bool, set[str]]:
    """:func:`stamped` on asyncpg: the worker checks the schema without loading psycopg."""
    q = SchemaSQL.load(schema)
    row = await conn.fetchrow(q.tables)
    assert row is not None
    has_tasks, versioned = row
    return bool(has_tasks), ({r[0] for r in await conn.fetch(q.revision)} if versioned else set())


def state_of(has_tasks: bool, found: set[str]) -> SchemaState:
    """Where a schema with (or without) jobq's tasks table and these stamped revisions stands."""
    if not has_tasks:
        return SchemaState.MISSING
    if not found:
        return SchemaState.BEHIND
    if found == {head_revision()}:
        return SchemaState.CURRENT
    return SchemaState.BEHIND if found <= set(revisions()) else SchemaState.NEWER


def schema_state(conn: psycopg.Connection[Any], schema: str) -> SchemaState:
    """Where the schema in `conn`'s database stands relative to this jobq."""
    return state_of(*stamped(conn, schema))


async def aschema_state(conn: asyncpg.Connection, schema: str) -> SchemaState:
    """:func:`schema_state` on asyncpg."""
    return state_of(*await astamped(conn, schema))
