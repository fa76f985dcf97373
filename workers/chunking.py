"""Split extracted text into overlapping, token-bounded chunks.

Chunks are the unit of retrieval, so a chunk should read as a coherent piece
of the source: the chunker packs whole paragraphs and only breaks one up when
it alone exceeds the budget (first at sentence ends, then, for a runaway
"sentence" such as a table dump, between tokens). Consecutive chunks share a
short tail so that a fact straddling a boundary is still retrievable from
either side.

Token counts come from a small regex tokenizer (see :func:`tokenize`) rather
than a model tokenizer: workers must run offline, and the budget only needs to
be proportional to what an embedding model will see, not exact.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from .extract import Segment

__all__ = ["Chunk", "chunk", "count_tokens", "tokenize"]

# A token is a run of word characters or a single other visible character.
# This over-counts relative to BPE tokenizers for punctuation-heavy text and
# under-counts for long rare words, landing within ~20-30% of typical model
# token counts for English prose; good enough for sizing.
_TOKEN: Final = re.compile(r"\w+|[^\w\s]")
_PARAGRAPH_BREAK: Final = re.compile(r"\n[ \t]*\n\s*")
# A sentence ends at ., ! or ? (optionally followed by closing quotes or
# brackets) and whitespace. Abbreviations like "e.g." cause harmless extra
# breaks: sentences are only a fallback for oversized paragraphs.
_SENTENCE_END: Final = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")


def tokenize(text: str) -> list[str]:
    """Return the tokens counted against a chunk's budget."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    """Count tokens without building the list, for hot paths."""
    return sum(1 for _ in _TOKEN.finditer(text))


@dataclass(frozen=True, slots=True)
class Chunk:
    """One retrievable piece of a document.

    ``first_page``/``last_page`` are the segment indexes (pages, or table
    rows) the text came from, inclusive, so a search hit can cite its source.
    ``digest`` is the SHA-256 of ``text`` and lets storage skip chunks it
    already holds when a task is retried.
    """

    text: str
    token_count: int
    position: int
    first_page: int
    last_page: int
    digest: str


@dataclass(frozen=True, slots=True)
class _Piece:
    """A unit the packer never splits: a paragraph, sentence or token window."""

    text: str
    page: int
    tokens: int
    starts_paragraph: bool


def chunk(segments: Iterable[Segment], *, max_tokens: int = 256, overlap: int = 32) -> list[Chunk]:
    """Pack segments into chunks of at most ``max_tokens`` tokens.

    Every chunk after the first starts with up to ``overlap`` tokens copied
    from the end of the previous one. The overlap shrinks when the next piece
    of text would otherwise not fit, so ``max_tokens`` is a hard limit.
    Paragraphs may span segment (page) boundaries in the output, which is why
    each chunk records a page range rather than a single page.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), got {overlap} with max_tokens={max_tokens}")

    chunks: list[Chunk] = []
    current: list[_Piece] = []
    used = 0
    fresh = False  # whether ``current`` holds anything beyond copied overlap
    for piece in _pieces(segments, max_tokens):
        if fresh and used + piece.tokens > max_tokens:
            chunks.append(_make_chunk(current, len(chunks)))
            current = _tail(current, min(overlap, max_tokens - piece.tokens))
            used = sum(p.tokens for p in current)
        current.append(piece)
        used += piece.tokens
        fresh = True
    if fresh:
        chunks.append(_make_chunk(current, len(chunks)))
    return chunks


def _pieces(segments: Iterable[Segment], max_tokens: int) -> Iterable[_Piece]:
    for segment in segments:
        for paragraph in _PARAGRAPH_BREAK.split(segment.text):
            paragraph = paragraph.strip()
            tokens = count_tokens(paragraph)
            if tokens == 0:
                continue
            if tokens <= max_tokens:
                yield _Piece(paragraph, segment.index, tokens, True)
                continue
            first = True
            for sentence in _SENTENCE_END.split(paragraph):
                for part in _fit(sentence.strip(), max_tokens):
                    yield _Piece(part, segment.index, count_tokens(part), first)
                    first = False


def _fit(sentence: str, max_tokens: int) -> Iterable[str]:
    """Yield the sentence whole if it fits, else consecutive token windows."""
    spans = [m.span() for m in _TOKEN.finditer(sentence)]
    if len(spans) <= max_tokens:
        if spans:
            yield sentence
        return
    for i in range(0, len(spans), max_tokens):
        window = spans[i : i + max_tokens]
        yield sentence[window[0][0] : window[-1][1]]


def _tail(pieces: list[_Piece], budget: int) -> list[_Piece]:
    """Copy the last ``budget`` tokens of a chunk, cutting at a token start."""
    if budget <= 0:
        return []
    tail: list[_Piece] = []
    remaining = budget
    for piece in reversed(pieces):
        if piece.tokens <= remaining:
            tail.append(piece)
            remaining -= piece.tokens
        else:
            starts = [m.start() for m in _TOKEN.finditer(piece.text)]
            cut = piece.text[starts[len(starts) - remaining] :]
            tail.append(_Piece(cut, piece.page, remaining, False))
            remaining = 0
        if remaining == 0:
            break
    tail.reverse()
    return tail


def _make_chunk(pieces: list[_Piece], position: int) -> Chunk:
    parts: list[str] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append("\n\n" if piece.starts_paragraph else " ")
        parts.append(piece.text)
    text = "".join(parts)
    pages = [p.page for p in pieces]
    return Chunk(
        text=text,
        token_count=count_tokens(text),
        position=position,
        first_page=min(pages),
        last_page=max(pages),
        digest=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )
