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
from typing import Any

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


def enqueue_documents(
    sources: Iterable[Source],
    *,
    parser: str = "general",
    page_size: int | None = None,
    pages: str | Sequence[tuple[int, int]] | None = None,
    priority: int = 0,
    then: str | None = None,
    owner: str | None = None,
    by_reference: bool = False,
    force: bool = False,
    url: str | None = None,
    settings: Settings | None = None,
) -> BatchResult:
    """Enqueue documents (paths, or ``(name, bytes)``) as one batch, as `jobq enqueue FILE...` does.

    A refused document does not stop the others: its :class:`FileResult` carries the one-line reason
    (``result.errors``). A bad option raises :class:`DocumentError` before anything is read or written.
    """
    return enqueue_files([_source(s) for s in sources], parser=parser, page_size=page_size, pages=pages,
                         priority=priority, then=then, owner=owner, by_reference=by_reference, force=force,
                         url=url, settings=settings)


def enqueue_document(
    source: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    parser: str = "general",
    page_size: int | None = None,
    pages: str | Sequence[tuple[int, int]] | None = None,
    priority: int = 0,
    then: str | None = None,
    owner: str | None = None,
    by_reference: bool = False,
    force: bool = False,
    url: str | None = None,
    settings: Settings | None = None,
) -> FileResult:
    """Enqueue one document (a path, or bytes with `name`); :class:`DocumentError` with the reason if refused.

    The same bytes again re-parse the same document, reusing the tasks whose content and settings did
    not change; a document whose previous run is still live is refused.
    """
    result = enqueue_files([_source(source, name)], parser=parser, page_size=page_size, pages=pages,
                           priority=priority, then=then, owner=owner, by_reference=by_reference, force=force,
                           url=url, settings=settings)
    found = result.files[0]
    if found.error is not None:
        raise DocumentError(f"{found.path}: {found.error}")
    return found


async def enqueue_document_async(source: str | os.PathLike[str] | bytes, **options: Any) -> FileResult:
    """:func:`enqueue_document` off the event loop (reading and splitting a file is CPU and disk work)."""
    return await asyncio.to_thread(enqueue_document, source, **options)


async def enqueue_documents_async(sources: Iterable[Source], **options: Any) -> BatchResult:
    """:func:`enqueue_documents` off the event loop."""
    return await asyncio.to_thread(enqueue_documents, list(sources), **options)


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


__all__ = ["DocumentFailed", "Source", "enqueue_document", "enqueue_document_async", "enqueue_documents",
           "enqueue_documents_async", "wait_document", "wait_document_async"]
