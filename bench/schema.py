"""The schema the benchmarks and the chaos run work in: JOBQ_SCHEMA, as for jobq itself.

CI runs the suite under a non-default schema, so the bench writes table names unqualified and points
the database's search_path at the schema once (``use_schema``), the way the test databases do.
"""

from __future__ import annotations

import os

import psycopg
from psycopg import sql

SCHEMA = os.environ.get("JOBQ_SCHEMA") or "jobq"


def use_schema(url: str) -> None:
    """Make every later session of the database at `url` resolve unqualified names in SCHEMA first."""
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute("SELECT current_database()").fetchone()
        assert row is not None
        c.execute(sql.SQL("ALTER DATABASE {} SET search_path = {}, public").format(
            sql.Identifier(row[0]), sql.Identifier(SCHEMA)))
