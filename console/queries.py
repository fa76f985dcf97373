"""The console's statements, kept in ``sql/console.sql`` like the queue library's and the pipeline's own."""

from __future__ import annotations

from jobqueue import SQLFile


class ConsoleSQL(SQLFile, package="jobq_console", filename="sql/console.sql"):
    """Every statement the console runs itself (the rest goes through Client and jobq_workers)."""

    access: str
    overview: str
    parents: str
    children: str
    queue_position: str
    documents: str
    document: str
    document_tasks: str
    document_chunks: str
    document_summaries: str
    own_document_chunks: str
    own_document_summaries: str
    running_tasks: str
    live_tasks: str
    live_documents: str
    workers: str
    failures: str
    flow_control: str
