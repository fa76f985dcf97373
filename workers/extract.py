"""Extract plain text from one task's page or row range of a document.

The dataflow worker calls :func:`iter_extract` and checks for cancellation
between segments, which is why extraction is a generator that yields one page
(or one table row) at a time instead of returning the whole range at once: a
cancelled 12-page task stops after the current page, not after the twelfth.

Format detection and PDF/table reading are shared with ``jobq_workers.splitter``
so that the ranges computed at enqueue time address exactly the pages and
rows read here.
"""

from __future__ import annotations

import io
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Final

from .splitter import (
    UnsupportedDocument,
    decode_text,
    iter_table_rows,
    open_document,
)

if TYPE_CHECKING:
    from pypdf import PdfReader

__all__ = ["Segment", "extract", "html_to_text", "iter_extract"]


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of extracted text and where in the document it came from.

    ``index`` is the absolute 0-based page number for PDFs, the 0-based data
    row for tables (the header is not a row), and 0 for single-unit text
    documents, so chunks can cite their source regardless of which task
    produced them.
    """

    index: int
    text: str


def extract(kind: str, name: str, data: bytes, from_page: int, to_page: int) -> list[Segment]:
    """Extract the whole ``[from_page, to_page)`` range at once.

    Convenient for tests and small documents; workers that must honour
    cancellation should iterate :func:`iter_extract` instead.
    """
    return list(iter_extract(kind, name, data, from_page, to_page))


def iter_extract(
    kind: str, name: str, data: bytes, from_page: int, to_page: int
) -> Generator[Segment, None, None]:
    """Yield one :class:`Segment` per page (PDF) or data row (table).

    A generator rather than a plain iterator so a worker that stops early
    (cancellation) can ``close()`` it and release the parsed document at once.

    Text documents are a single unit and yield at most one segment. Ranges
    reaching past the end of the document are clipped rather than rejected,
    matching how the splitter clips ``--pages``. Segments whose text is empty
    (scanned pages, blank rows) are skipped: they would only produce empty
    chunks.
    """
    if from_page < 0 or to_page < from_page:
        raise ValueError(f"invalid unit range [{from_page}, {to_page})")
    fmt, reader = open_document(name, data)
    if kind == "pdf" and reader is not None:
        yield from _iter_pdf(reader, from_page, to_page)
    elif kind == "table" and fmt in {"csv", "tsv", "xlsx", "xls"}:
        yield from _iter_table(fmt, data, from_page, to_page)
    elif kind == "text" and fmt in {"txt", "md", "html", "docx"}:
        if from_page <= 0 < to_page:
            text = _document_text(fmt, data)
            if text.strip():
                yield Segment(0, text)
    else:
        raise ValueError(f"{name!r} is a {fmt} file, which cannot be extracted as kind {kind!r}")


# --------------------------------------------------------------------------
# PDF

_SPACE_RUN: Final = re.compile(r"[ \t\u00a0]{2,}")
_BLANK_RUN: Final = re.compile(r"\n{3,}")


def _iter_pdf(reader: PdfReader, from_page: int, to_page: int) -> Iterator[Segment]:
    for index in range(from_page, min(to_page, len(reader.pages))):
        page = reader.pages[index]
        try:
            # Layout mode keeps vertical gaps as blank lines, which is the only
            # paragraph signal a PDF offers and what the chunker splits on.
            raw = page.extract_text(extraction_mode="layout")
        except Exception:
            # Layout mode is stricter about fonts and matrices; plain mode
            # loses paragraph breaks but still recovers the words.
            try:
                raw = page.extract_text()
            except Exception as exc:
                raise UnsupportedDocument(f"corrupt PDF: page {index + 1} cannot be read: {exc}") from None
        text = _tidy_pdf_text(raw)
        if text:
            yield Segment(index, text)


def _tidy_pdf_text(raw: str) -> str:
    """Drop layout padding while keeping line and paragraph breaks."""
    lines = [_SPACE_RUN.sub(" ", line).strip() for line in raw.splitlines()]
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip()


# --------------------------------------------------------------------------
# Tables


def _iter_table(fmt: str, data: bytes, from_page: int, to_page: int) -> Iterator[Segment]:
    """Render each data row as ``column: value; ...`` text.

    Naming every value after its column keeps a row meaningful when it is
    retrieved on its own, far from the header. Empty cells are left out, and
    columns without a header get a positional name.
    """
    rows = iter_table_rows(fmt, data)
    header = next(rows, None)
    if header is None:
        return
    columns = [h.strip() or f"column {i + 1}" for i, h in enumerate(header)]
    for index, row in enumerate(rows):
        if index >= to_page:
            break
        if index < from_page:
            continue
        parts = []
        for i, cell in enumerate(row):
            value = cell.strip()
            if value:
                column = columns[i] if i < len(columns) else f"column {i + 1}"
                parts.append(f"{column}: {value}")
        yield Segment(index, "; ".join(parts))


# --------------------------------------------------------------------------
# Text documents


def _document_text(fmt: str, data: bytes) -> str:
    if fmt == "docx":
        return _docx_text(data)
    text = decode_text(data).replace("\r\n", "\n").replace("\r", "\n")
    if fmt == "html":
        return html_to_text(text)
    return text


def _docx_text(data: bytes) -> str:
    """Read paragraphs and tables in document order with python-docx.

    python-docx is optional: most deployments never see Word files, and a
    clear error at processing time is better than a hard dependency.
    """
    try:
        import docx
    except ImportError:
        raise UnsupportedDocument(
            "reading .docx files needs the optional 'python-docx' package (pip install python-docx)"
        ) from None
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:
        raise UnsupportedDocument(f"corrupt docx file: {exc}") from None
    blocks: list[str] = []
    for block in document.iter_inner_content():
        if isinstance(block, docx.table.Table):
            for row in block.rows:
                cells = [cell.text.strip() for cell in row.cells]
                if any(cells):
                    blocks.append(" | ".join(cells))
        elif block.text.strip():
            blocks.append(block.text.strip())
    return "\n\n".join(blocks)


class _TextCollector(HTMLParser):
    """Collect visible text, turning block elements into paragraph breaks."""

    _SKIP: Final = frozenset({"script", "style", "head", "title", "noscript", "template", "svg"})
    _BLOCK: Final = frozenset(
        {
            "p", "div", "section", "article", "header", "footer", "main", "aside", "nav",
            "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "table", "tr",
            "blockquote", "pre", "figure", "figcaption", "dl", "dt", "dd", "hr", "form",
        }
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag in self._BLOCK:
            if tag == "pre":
                self._pre_depth += 1
            self.parts.append("\n\n")
        elif tag == "br":
            self.parts.append("\n")
        elif tag in {"td", "th"}:
            self.parts.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in self._BLOCK:
            if tag == "pre":
                self._pre_depth = max(0, self._pre_depth - 1)
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        # Outside <pre>, a newline in the source is just a space; only <br>
        # and block elements break lines.
        self.parts.append(data if self._pre_depth else data.replace("\n", " "))


_INLINE_SPACE: Final = re.compile(r"[ \t\r\f\v\u00a0]+")
_CELL_EDGE: Final = re.compile(r"^\s*\|\s*|\s*\|\s*$", re.MULTILINE)


def html_to_text(html: str) -> str:
    """Strip tags, scripts and styles, keeping paragraph structure.

    Source whitespace in HTML is insignificant, so it is collapsed; block
    elements become blank lines so the chunker sees the same paragraphs a
    reader would.
    """
    collector = _TextCollector()
    collector.feed(html)
    collector.close()
    text = "".join(collector.parts)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [_INLINE_SPACE.sub(" ", line).strip() for line in block.split("\n")]
        joined = _CELL_EDGE.sub("", "\n".join(line for line in lines if line))
        if joined.strip():
            paragraphs.append(joined.strip())
    return "\n\n".join(paragraphs)
