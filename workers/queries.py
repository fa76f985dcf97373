"""The pipeline's statements, kept in ``sql/documents.sql`` like the queue library's own.

The documents, batches and chunks tables belong to the pipeline (jobq's migrations create them), so
their statements live here rather than in the queue library; the file is loaded with jobq's public
:class:`~jobqueue.SQLFile`, which checks this declaration against the file at import.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from jobqueue import SQLFile, get_settings


class DocumentSQL(SQLFile, package="jobq_workers", filename="sql/documents.sql"):
    """Every statement of the document pipeline (enqueue, watch, the dataflow and raptor handlers)."""

    new_batch: str
    batch_rejected: str
    find_document: str
    insert_document: str
    update_document: str
    live_task_count: str
    reusable_tasks: str
    summary_count: str
    reuse_task: str
    replace_document_run: str
    list_documents: str
    batch_documents: str
    batch_exists: str
    document_exists: str
    task_exists: str
    listen_progress: str
    document_rows: str
    task_rows: str
    load_document: str
    insert_chunks: str
    document_chunks: str
    delete_summaries: str
    link_parents: str


def sql(schema: str | None = None) -> DocumentSQL:
    """The statements for `schema` (default: the configured one), built once per schema."""
    return DocumentSQL.load(schema or get_settings().schema_name)


def fetch(conn: psycopg.Connection[Any], statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on a psycopg connection; its rows, if it returns any.

    A RawCursor, because the statements use PostgreSQL's $n parameters (the text asyncpg runs too).
    """
    with psycopg.RawCursor(conn) as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


def fetch_dicts(conn: psycopg.Connection[Any], statement: str, *params: Any) -> list[dict[str, Any]]:
    """:func:`fetch` with each row as a dict by column name."""
    with psycopg.RawCursor(conn, row_factory=dict_row) as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


__all__ = ["DocumentSQL", "fetch", "fetch_dicts", "sql"]
