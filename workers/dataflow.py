"""The ``dataflow`` task: one page (or row) range of a document → stored chunks.

Everything the task writes commits in the transaction that marks it done (``ctx.transaction()``):
a worker killed mid-task leaves no chunk behind, and the attempt that finally completes writes its
chunks exactly once. Extraction is CPU-bound, so it runs in a thread, where every page reports
progress; that report is also where a cancelled task stops (``ctx.progress`` raises Cancelled).

The SQL is the pipeline's own (sql/documents.sql: documents and chunks are its tables, created by
jobq's migration); raptor.py reuses these helpers. Heavy libraries are imported by the extraction code only, so
importing this module, which every producer does to validate the payload, stays cheap.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from jobqueue import Context, Fail, task

from .queries import sql

if TYPE_CHECKING:
    import asyncpg

    from .chunking import Chunk

__all__ = ["DataflowPayload", "Document", "dataflow", "insert_chunks", "load_document"]

# Stage boundaries of a dataflow task's progress (RAGFlow users read these numbers).
FETCHED, EXTRACTED, CHUNKED, STORED = 0.05, 0.65, 0.8, 0.95


class DataflowPayload(BaseModel):
    """Chunking settings; the document and its range come from the task row itself."""

    parser: str = "general"
    max_tokens: int = Field(256, ge=16, le=8192)
    overlap: int = Field(32, ge=0, le=1024)


@dataclass(frozen=True)
class Document:
    id: int
    name: str
    format: str
    kind: str
    pages: int
    size: int
    content_digest: str
    content: bytes | None
    uri: str | None


async def load_document(conn: asyncpg.Connection, doc_id: int | None, *, with_content: bool = True) -> Document:
    """The document row; a missing one is final (it was deleted, and its tasks with it)."""
    if doc_id is None:
        raise Fail("this task has no document (doc_id is NULL)")
    row = await conn.fetchrow(sql().load_document, doc_id, with_content)
    if row is None:
        raise Fail(f"document {doc_id} no longer exists")
    return Document(**dict(row))


def read_bytes(doc: Document) -> bytes:
    """The document's bytes, from the row or from shared storage (--by-reference).

    A referenced file that changed since it was enqueued no longer matches the page ranges that were
    planned from it, so it fails the task for good instead of chunking the wrong text.
    """
    if doc.content is not None:
        return doc.content
    assert doc.uri is not None
    path = Path(doc.uri.removeprefix("file://"))
    data = path.read_bytes()  # OSError: retried (shared storage may be briefly unavailable)
    if hashlib.sha256(data).hexdigest() != doc.content_digest:
        raise Fail(f"{path} changed since it was enqueued (content digest differs); enqueue it again")
    return data


async def insert_chunks(conn: asyncpg.Connection, doc_id: int, task_id: int, level: int,
                        rows: Sequence[tuple[int, int, int, str, int, str]]) -> dict[int, int]:
    """Insert (position, from_page, to_page, text, token_count, digest) rows; returns {position: id}."""
    if not rows:
        return {}
    cols = list(zip(*rows, strict=True))
    out = await conn.fetch(sql().insert_chunks, doc_id, task_id, level, *[list(c) for c in cols])
    return {int(r["position"]): int(r["id"]) for r in out}


def _extract_and_chunk(ctx: Context, doc: Document, payload: DataflowPayload, lo: int, hi: int) -> list[Chunk]:
    """Runs in a thread: read, extract page by page (reporting each), chunk."""
    from .chunking import chunk
    from .extract import iter_extract

    data = read_bytes(doc)
    unit = "page" if doc.kind == "pdf" else "row" if doc.kind == "table" else "document"
    total = max(1, hi - lo)
    started = time.monotonic()
    segments = []
    chars = 0
    ctx.progress(FETCHED, f"Extracting {unit}s {lo + 1}-{hi} of {doc.name}." if doc.kind != "text"
                 else f"Extracting {doc.name}.")
    pages = iter_extract(doc.kind, doc.name, data, lo, hi)
    try:
        for seg in pages:
            segments.append(seg)
            chars += len(seg.text)
            ctx.progress(FETCHED + (EXTRACTED - FETCHED) * (seg.index - lo + 1) / total)
    except ValueError as exc:  # UnsupportedDocument included: the bytes will not get better
        raise Fail(str(exc)) from None
    finally:
        pages.close()
    ctx.progress(EXTRACTED, f"Extracted {len(segments)} {unit}(s) with text, {chars} characters, "
                            f"in {time.monotonic() - started:.2f}s.")
    chunks = chunk(segments, max_tokens=payload.max_tokens, overlap=min(payload.overlap, payload.max_tokens - 1))
    ctx.progress(CHUNKED, f"Chunked into {len(chunks)} chunk(s), {sum(c.token_count for c in chunks)} tokens.")
    return chunks


@task("dataflow", payload=DataflowPayload, max_retries=3, timeout=900, concurrency=2)
async def dataflow(ctx: Context, payload: DataflowPayload) -> None:
    t = ctx.task
    ctx.progress(0.0, f"Task has been received (attempt {t.attempt}).")
    async with ctx.connection() as conn:
        doc = await load_document(conn, t.doc_id)
    lo = t.from_page if t.from_page is not None else 0
    hi = min(t.to_page if t.to_page is not None else doc.pages, doc.pages)
    # Parsing happens outside any transaction; only the writes share the completion's transaction.
    chunks = await asyncio.to_thread(_extract_and_chunk, ctx, doc, payload, lo, hi)
    ctx.raise_if_cancelled()
    async with ctx.transaction() as conn:
        ids = await insert_chunks(conn, doc.id, t.id, 0, [
            (c.position, c.first_page, c.last_page, c.text, c.token_count, c.digest) for c in chunks])
        tokens = sum(c.token_count for c in chunks)
        ctx.progress(STORED, f"Stored {len(ids)} chunk(s)." if chunks else "No text found in this range.")
        result: dict[str, Any] = {"chunks": len(ids), "tokens": tokens, "chunk_ids": sorted(ids.values())}
        ctx.result = result
