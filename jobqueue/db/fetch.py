"""One statement on a psycopg connection, its rows as dicts by column name.

The sync client runs its reads through this function: a row is read by column name everywhere, never
re-sliced by position. (The read-only CLI reads on asyncpg: db/reader.py.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

Row = dict[str, Any]


def fetch(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> list[Row]:
    """Rows of `sql` with `params` ($1 style, sent as-is: RawCursor), [] for a statement without rows."""
    with psycopg.RawCursor(conn, row_factory=dict_row) as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []
