"""The public document API: ingest documents from Python, and wait for them, without the CLI.

``enqueue_document`` and ``enqueue_documents`` go through the very code `jobq enqueue FILE...` runs
(:func:`.documents.enqueue_files`), so a document is checked, stored, split, reused and refused by
the same rules; a document may also be given as bytes with a name. ``wait_document`` is built on
the queue's public waiting API (``Client.events``): one LISTEN per process, whatever the number of
waiters. Each has an ``_async`` twin for event-loop code.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from typing import TypedDict, Unpack

from jobqueue import AsyncClient, Client, DocumentError, JobqError, Settings, connect

from .documents import BatchResult, Blob, FileResult, enqueue_files
from .queries import fetch_dicts, sql
from .watch import Row

Source = str | os.PathLike[str] | bytes | tuple[str, bytes]


class DocumentFailed(JobqError):
    """A waited-for document ended failed or cancelled: its final status and the reason."""

    def __init__(self, doc_id: int, status: str, error: str | None) -> None:
        super().__init__(f"document {doc_id} {status}" + (f": {error}" if error else ""))
        self.doc_id = doc_id
        self.status = status
        self.error = error


def _source(item: Source, name: str | None = None) -> str:
    """A path as enqueue_files takes it, or bytes with their name as a :class:`Blob`."""
    if isinstance(item, tuple):
        name, item = item
    if isinstance(item, bytes | bytearray | memoryview):
        if not name:
            raise DocumentError("a document given as bytes needs a name (name='report.pdf')")
        return Blob(name, bytes(item))
    if name is not None:
        raise DocumentError("name= is for a document given as bytes; a file is named after its path")
    if isinstance(item, str | os.PathLike):
        return os.fspath(item)
    raise DocumentError(f"a document is a path or bytes, got {type(item).__name__}")


class DocumentOptions(TypedDict, total=False):
    """The options of `jobq enqueue FILE...`, with its defaults (see :func:`.documents.enqueue_files`)."""

    parser: str  # general, paper, book, table, one
    page_size: int | None  # pages per task (default 12; 22 for paper)
    pages: str | Sequence[tuple[int, int]] | None  # "1-20,30-40" or [(0, 20), (29, 40)]
    priority: int
    then: str | None  # a task type to run per document after all its tasks (e.g. raptor)
    owner: str | None
    by_reference: bool  # store only the file's path (shared storage), not its bytes
    force: bool  # reprocess even unchanged ranges
    url: str | None
    settings: Settings | None


def enqueue_documents(sources: Iterable[Source], **options: Unpack[DocumentOptions]) -> BatchResult:
    """Enqueue documents (paths, or ``(name, bytes)``) as one batch, as `jobq enqueue FILE...` does.

    A refused document does not stop the others: its :class:`FileResult` carries the one-line reason
    (``result.errors``). A bad option raises :class:`DocumentError` before anything is read or written.
    """
    return enqueue_files([_source(s) for s in sources], **options)


def enqueue_document(source: str | os.PathLike[str] | bytes, *, name: str | None = None,
                     **options: Unpack[DocumentOptions]) -> FileResult:
    """Enqueue one document (a path, or bytes with `name`); :class:`DocumentError` with the reason if refused.

    The same bytes again re-parse the same document, reusing the tasks whose content and settings did
    not change; a document whose previous run is still live is refused.
    """
    found = enqueue_files([_source(source, name)], **options).files[0]
    if found.error is not None:
        raise DocumentError(f"{found.path}: {found.error}")
    return found


async def enqueue_document_async(source: str | os.PathLike[str] | bytes, *, name: str | None = None,
                                 **options: Unpack[DocumentOptions]) -> FileResult:
    """:func:`enqueue_document` off the event loop (reading and splitting a file is CPU and disk work)."""
    return await asyncio.to_thread(lambda: enqueue_document(source, name=name, **options))


async def enqueue_documents_async(sources: Iterable[Source], **options: Unpack[DocumentOptions]) -> BatchResult:
    """:func:`enqueue_documents` off the event loop."""
    items = list(sources)
    return await asyncio.to_thread(lambda: enqueue_documents(items, **options))


# ---------------------------------------------------------------- waiting


def _document(url: str, schema: str, doc_id: int) -> Row:
    """The document's state as `jobq watch` shows it (the document_progress view)."""
    q = sql(schema)
    with connect(url, autocommit=True) as conn:
        rows = fetch_dicts(conn, q.document_rows, [doc_id])
    if not rows:
        raise DocumentError(f"no document {doc_id}")
    r = rows[0]
    return Row(f"doc:{doc_id}", r["name"], r["status"], r["progress"], r["queue_position"], r["chunks"],
               r["summaries"], r["last_message"] or "", r["error"])


def _outcome(doc_id: int, row: Row) -> Row:
    if row.status != "done":
        raise DocumentFailed(doc_id, row.status, row.reason)
    return row


def wait_document(doc_id: int, *, timeout: float | None = None, client: Client | None = None) -> Row:
    """Block until every task of the document is final; its state (chunks, summaries) if it ended done,
    else :class:`DocumentFailed`; ``jobqueue.WaitTimeout`` after `timeout` seconds."""
    own = client is None
    c = client or Client()
    try:
        _document(c.url, c.settings.schema_name, doc_id)  # an unknown document fails now, not at the end
        for _ in c.events(doc_id=doc_id, timeout=timeout):
            pass
        return _outcome(doc_id, _document(c.url, c.settings.schema_name, doc_id))
    finally:
        if own:
            c.close()


async def wait_document_async(doc_id: int, *, timeout: float | None = None,
                              client: AsyncClient | None = None) -> Row:
    """:func:`wait_document` for event-loop code, on an :class:`~jobqueue.AsyncClient`."""
    own = client is None
    c = client or AsyncClient()
    try:
        await asyncio.to_thread(_document, c.url, c.settings.schema_name, doc_id)
        async for _ in c.events(doc_id=doc_id, timeout=timeout):
            pass
        return _outcome(doc_id, await asyncio.to_thread(_document, c.url, c.settings.schema_name, doc_id))
    finally:
        if own:
            await c.close()


__all__ = ["DocumentFailed", "DocumentOptions", "Source", "enqueue_document", "enqueue_document_async",
           "enqueue_documents", "enqueue_documents_async", "wait_document", "wait_document_async"]
