"""The ``raptor`` task: summarise a document's chunks into a RAPTOR tree, stored as chunks.

It runs once all the document's dataflow tasks are done (``jobq enqueue --then raptor`` makes it
depend on them). Summaries are chunks with ``level`` >= 1; every chunk or summary points at the
summary above it through ``parent_id`` (not always one level up: a cluster of one is carried up
rather than summarised), up to a single root. Chunks without text (a table of contents, a bare page
number) join no cluster and keep ``parent_id`` NULL. Like dataflow, everything commits with the task's
completion, and a rerun replaces the document's previous summaries instead of adding to them.
Offline by default (see raptor_tree); clustering and summarising run in a thread, and each finished
level reports progress, which is where a cancelled task stops.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from jobqueue import Context, Fail, task

from .dataflow import insert_chunks, load_document
from .extras import missing
from .queries import sql

if TYPE_CHECKING:
    from .raptor_tree import Node

__all__ = ["RaptorPayload", "raptor"]


class RaptorPayload(BaseModel):
    # Only a safety bound since the tree always ends in one root (see raptor_tree.build_tree).
    max_levels: int = Field(24, ge=1, le=64)
    max_cluster_size: int = Field(10, ge=2, le=1000)
    max_sentences: int = Field(6, ge=1, le=100)
    # A summary is retrieved like a chunk, so it gets a chunk's budget (dataflow's max_tokens).
    max_tokens: int = Field(256, ge=16, le=8192)


def _build(ctx: Context, texts: list[str], payload: RaptorPayload) -> tuple[list[Node], int]:
    """Runs in a thread; numpy and scikit-learn load here, not when the module is imported.

    Returns the nodes and how many chunks have no text to summarise (see raptor_tree.has_text).
    """
    try:
        from .raptor_tree import RaptorError, build_tree, has_text
    except ImportError as exc:  # a worker installed without the [documents] extra
        raise missing(exc.name or "numpy") from None

    clustered = sum(1 for t in texts if has_text(t))

    def on_level(level: int, nodes: list[Node], remaining: int) -> None:
        # Each level leaves fewer nodes to cluster; the tree is done at one.
        done = 1 - (remaining - 1) / max(1, clustered - 1)
        ctx.progress(0.1 + 0.8 * done, f"Level {level}: {len(nodes)} summaries, {remaining} node(s) left to cluster.")

    try:
        nodes = build_tree(texts, max_levels=payload.max_levels, max_cluster_size=payload.max_cluster_size,
                           max_sentences=payload.max_sentences, max_tokens=payload.max_tokens, on_level=on_level)
    except RaptorError:
        raise  # a model service failed: retried with backoff
    except ValueError as exc:
        raise Fail(str(exc)) from None
    return nodes, len(texts) - clustered


@task("raptor", payload=RaptorPayload, max_retries=3, timeout=3600, concurrency=1)
async def raptor(ctx: Context, payload: RaptorPayload) -> None:
    from .chunking import count_tokens

    q = sql()
    ctx.progress(0.0, f"Task has been received (attempt {ctx.task.attempt}).")
    async with ctx.connection() as conn:
        doc = await load_document(conn, ctx.task.doc_id, with_content=False)
        rows = await conn.fetch(q.document_chunks, doc.id)
    ctx.progress(0.1, f"Building the RAPTOR tree of {doc.name} over {len(rows)} chunk(s).")
    # The clustering runs outside any transaction; the summaries commit with the completion.
    nodes, textless = await asyncio.to_thread(_build, ctx, [r["text"] for r in rows], payload)
    ctx.raise_if_cancelled()
    async with ctx.transaction() as conn:
        await conn.execute(q.delete_summaries, doc.id)
        # Children are (level, index) references, possibly several levels down (a cluster of one is
        # carried up); level 0 are the chunk rows. Each reference maps to (id, from_page, to_page).
        placed: dict[tuple[int, int], tuple[int, int, int]] = {
            (0, i): (int(r["id"]), int(r["from_page"]), int(r["to_page"])) for i, r in enumerate(rows)}
        levels = sorted({n.level for n in nodes})
        for level in levels:
            members = sorted((n for n in nodes if n.level == level), key=lambda n: n.index)
            spans = [(min(placed[c][1] for c in n.children), max(placed[c][2] for c in n.children))
                     for n in members]
            ids = await insert_chunks(conn, doc.id, ctx.task.id, level, [
                (n.index, lo, hi, n.text, count_tokens(n.text), hashlib.sha256(n.text.encode()).hexdigest())
                for n, (lo, hi) in zip(members, spans, strict=True)])
            links = [(placed[c][0], ids[n.index]) for n in members for c in n.children]
            await conn.execute(q.link_parents, [c for c, _ in links], [p for _, p in links])
            placed.update({(level, n.index): (ids[n.index], lo, hi)
                           for n, (lo, hi) in zip(members, spans, strict=True)})
        counts = {level: sum(1 for n in nodes if n.level == level) for level in levels}
        ctx.progress(0.95, f"Stored {len(nodes)} summaries over {len(rows)} chunk(s): "
                           + (", ".join(f"level {k}: {v}" for k, v in counts.items()) or "nothing to summarise")
                           + (f"; {textless} chunk(s) without text left out" if textless else "") + ".")
        ctx.result = {"chunks": len(rows), "summaries": len(nodes), "levels": counts, "without_text": textless}
