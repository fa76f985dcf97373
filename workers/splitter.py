"""Turn an uploaded document into independent, idempotent ingestion tasks.

Everything here runs at enqueue time, before anything is written to the
queue, so a document that cannot be processed is rejected with a one-line
reason instead of producing tasks that fail later in a worker. The module is
deliberately free of database access: the queue layer feeds it bytes and
stores whatever ranges it returns.

Splitting follows RAGFlow's ``queue_tasks`` rules (page windows for PDFs, row
windows for tables, a single task for everything else) with one deliberate
difference: RAGFlow converts a 1-based inclusive ``--pages`` end ``e`` with
``min(e - 1, pages)``, which silently drops the last page of a range. Here the
end maps to ``min(e, pages)`` so every selected page lands in exactly one task.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Final

from .extras import missing

if TYPE_CHECKING:
    from pypdf import PdfReader

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "KINDS",
    "PAPER_PAGE_SIZE",
    "PARSERS",
    "TABLE_ROWS_PER_TASK",
    "Layout",
    "UnsupportedDocument",
    "content_digest",
    "count_units",
    "decode_text",
    "detect_format",
    "detect_kind",
    "inspect",
    "iter_table_rows",
    "open_document",
    "open_pdf",
    "parse_pages",
    "split",
    "task_digest",
]

KINDS: Final = ("pdf", "table", "text")
PARSERS: Final = ("general", "paper", "book", "table", "one")
DEFAULT_PAGE_SIZE: Final = 12
PAPER_PAGE_SIZE: Final = 22
TABLE_ROWS_PER_TASK: Final = 3000

# How far into the file a PDF header may start. The PDF spec wants it at
# offset 0, but readers (and therefore real-world producers) accept up to 1 KiB
# of leading junk, such as a stray BOM or an HTTP header left in by a crawler.
_PDF_HEADER_WINDOW: Final = 1024
_OLE2_MAGIC: Final = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_MAGIC: Final = b"PK\x03\x04"

# Binary formats people commonly upload by mistake; naming them makes the
# rejection message actionable ("that is a PNG") instead of generic.
_BINARY_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"GIF87a", "GIF image"),
    (b"GIF89a", "GIF image"),
    (b"II*\x00", "TIFF image"),
    (b"MM\x00*", "TIFF image"),
    (b"\x1f\x8b", "gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"),
    (b"Rar!\x1a\x07", "RAR archive"),
    (b"\x7fELF", "ELF executable"),
    (b"MZ", "Windows executable"),
    (b"{\\rtf", "RTF document"),
)

_TABLE_EXTENSIONS: Final = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
_TEXT_EXTENSIONS: Final = {
    ".txt": "txt",
    ".text": "txt",
    ".log": "txt",
    ".rst": "txt",
    ".json": "txt",
    ".md": "md",
    ".markdown": "md",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
}
_FORMAT_KIND: Final = {
    "pdf": "pdf",
    "csv": "table",
    "tsv": "table",
    "xlsx": "table",
    "xls": "table",
    "txt": "text",
    "md": "text",
    "html": "text",
    "docx": "text",
}
# Delimited table formats and their delimiter (None: sniffed from the content).
_DELIMITER: Final[dict[str, str | None]] = {"csv": None, "tsv": "\t"}
_HTML_SNIFF: Final = re.compile(r"^\s*(<!doctype\s+html|<html[\s>])", re.IGNORECASE)


class UnsupportedDocument(ValueError):
    """A document that can never be ingested, whatever the retry policy.

    A ``ValueError`` so callers that only validate input can treat it like any
    other bad argument, while the enqueue path can catch it specifically and
    report the message verbatim (it is always a single line).
    """


def content_digest(data: bytes) -> str:
    """Identify a document by its bytes, not its name, so re-uploads dedupe."""
    return hashlib.sha256(data).hexdigest()


def task_digest(
    content_digest: str,
    parser_settings: Mapping[str, Any],
    from_page: int,
    to_page: int,
) -> str:
    """Fingerprint a task so unchanged work can be recognised and skipped.

    The same document, parsed with the same settings over the same range,
    always yields the same chunks; hashing those inputs lets the queue reuse a
    finished task's output instead of re-running it. The JSON is canonical
    (sorted keys, no whitespace, no NaN) because a digest that depends on dict
    insertion order would defeat the purpose.
    """
    payload = {
        "content": content_digest,
        "parser": parser_settings,
        "from_page": from_page,
        "to_page": to_page,
    }
    try:
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"parser settings must be plain JSON data: {exc}") from exc
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------
# Format detection


def detect_kind(name: str, data: bytes) -> str:
    """Classify a document as ``"pdf"``, ``"table"`` or ``"text"``.

    The kind decides how the document is split; the finer format (which
    ``detect_format`` returns) decides how a worker reads it. Raises
    :class:`UnsupportedDocument` for anything a worker could not process.
    """
    return _FORMAT_KIND[detect_format(name, data)]


def detect_format(name: str, data: bytes) -> str:
    """Identify the concrete file format, trusting content over the name.

    Extensions lie (a ``.pdf`` that is really an HTML error page is a classic
    crawler artefact), so binary formats are recognised by their magic bytes
    and the extension is only consulted where content cannot decide, e.g. CSV
    versus plain text. Returns one of ``pdf``, ``csv``, ``tsv``, ``xlsx``,
    ``xls``, ``docx``, ``txt``, ``md`` or ``html``.
    """
    return open_document(name, data)[0]


@dataclass(frozen=True)
class Layout:
    """What enqueueing needs to know about a file: its format, its kind and how many units it has."""

    format: str
    kind: str
    units: int


def inspect(name: str, data: bytes) -> Layout:
    """Detect, validate and count in one reading: a PDF is opened (and its pages checked) once, a
    text file decoded once.

    Raises :class:`UnsupportedDocument` for anything a worker could not process.
    """
    fmt, reader, text = _open(name, data)
    kind = _FORMAT_KIND[fmt]
    if reader is not None:
        units = len(reader.pages)
    elif kind == "table":
        units = _count_rows(_iter_delimited(text, _DELIMITER[fmt]) if text is not None
                            else iter_table_rows(fmt, data))
    else:
        units = 1
    return Layout(fmt, kind, units)


def open_document(name: str, data: bytes) -> tuple[str, PdfReader | None]:
    """The format (as :func:`detect_format`) and, for a PDF, the reader that validated it.

    Handing the reader on lets callers count or read pages without parsing the file again.
    """
    fmt, reader, _ = _open(name, data)
    return fmt, reader


def _open(name: str, data: bytes) -> tuple[str, PdfReader | None, str | None]:
    """The format, the PDF reader of a PDF, and the decoded text of a text-based format."""
    if b"%PDF-" in data[:_PDF_HEADER_WINDOW]:
        return "pdf", open_pdf(data), None  # validates: raises for encrypted or corrupt files
    ext = PurePath(name).suffix.lower()
    binary = _binary_format(name, ext, data)
    if binary is not None:
        return binary, None, None
    try:
        text = decode_text(data)
    except UnicodeDecodeError:
        text = ""
    if not text.strip() or _looks_binary(text):
        raise UnsupportedDocument(
            f"unsupported document: {name!r} is binary, blank or not in a known text encoding"
        )
    return _text_format(name, ext, text), None, text


def _binary_format(name: str, ext: str, data: bytes) -> str | None:
    """A format recognised by its magic bytes, or None for bytes that should be text."""
    if not data:
        raise UnsupportedDocument(f"empty file: {name!r} has zero bytes")
    if ext == ".pdf":
        raise UnsupportedDocument(f"corrupt PDF: {name!r} has no PDF header")

    if data.startswith(_ZIP_MAGIC):
        return _detect_zip_format(name, ext, data)
    if data.startswith(_OLE2_MAGIC):
        if ext == ".xls":
            return "xls"
        # Office wraps password-protected .xlsx/.docx files in an OLE2
        # container too, which is the usual reason a modern name shows up here.
        raise UnsupportedDocument(
            f"unsupported document: {name!r} is a legacy or encrypted Office file; "
            "save it as .xlsx, .docx or .csv"
        )
    for magic, label in _BINARY_MAGIC:
        if data.startswith(magic):
            raise UnsupportedDocument(f"unsupported document: {name!r} is a {label}")
    return None


def _text_format(name: str, ext: str, text: str) -> str:
    """Decoded text: HTML by its content, otherwise the extension decides."""
    if _HTML_SNIFF.match(text[:512]):
        return "html"
    if ext in _TABLE_EXTENSIONS:
        return _TABLE_EXTENSIONS[ext]
    if ext in _TEXT_EXTENSIONS:
        return _TEXT_EXTENSIONS[ext]
    if ext in {".xlsx", ".xls", ".docx", ".doc"}:
        raise UnsupportedDocument(f"corrupt document: {name!r} is plain text, not a {ext[1:]} file")
    if ext == "":
        return "txt"
    raise UnsupportedDocument(f"unsupported document type {ext!r} ({name!r})")


def _looks_binary(text: str) -> bool:
    """Spot binary data that happened to decode, via control characters.

    The Windows-1252 fallback in :func:`decode_text` accepts almost any byte
    sequence, so decodability alone says little; real text has next to no
    C0 control characters besides whitespace.
    """
    sample = text[:65536]
    controls = sum(1 for ch in sample if ch < " " and ch not in "\t\n\r\f\v")
    return controls > len(sample) // 200


def _detect_zip_format(name: str, ext: str, data: bytes) -> str:
    """Tell OOXML formats apart by their part names rather than the extension."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        label = ext[1:] if ext in {".xlsx", ".docx"} else "zip"
        raise UnsupportedDocument(f"corrupt {label} file {name!r}: {exc}") from None
    if "xl/workbook.xml" in names:
        return "xlsx"
    if "word/document.xml" in names:
        return "docx"
    if "ppt/presentation.xml" in names:
        raise UnsupportedDocument(f"unsupported document: {name!r} is a PowerPoint file")
    if ext in {".xlsx", ".docx"}:
        raise UnsupportedDocument(f"corrupt {ext[1:]} file {name!r}: required parts are missing")
    raise UnsupportedDocument(f"unsupported document: {name!r} is a zip archive")


def open_pdf(data: bytes) -> PdfReader:
    """Open a PDF or explain, in one line, why it cannot be ingested.

    PDFs that only carry an owner password (the common "no printing"
    restriction) decrypt with an empty user password and are readable, so
    they are accepted; anything needing a real password is refused because
    workers have no way to obtain it. Shared with the extraction worker so
    that enqueue-time validation and processing can never disagree.
    """
    try:  # deferred: a light install (no [documents] extra) can still import this module
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise missing("pypdf") from None

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                decrypted = bool(reader.decrypt(""))
            except Exception:  # e.g. AES without a crypto backend
                decrypted = False
            if not decrypted:
                raise UnsupportedDocument("encrypted PDF is not supported")
        pages = len(reader.pages)
        # Resolving each page's media box proves the page objects exist; a
        # truncated file often has a valid-looking page count but no pages.
        for page in reader.pages:
            _ = page.mediabox
    except UnsupportedDocument:
        raise
    except (
        PyPdfError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        AssertionError,
        RecursionError,
    ) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnsupportedDocument(f"corrupt PDF: {detail}") from None
    if pages == 0:
        raise UnsupportedDocument("corrupt PDF: the document has no pages")
    return reader


def decode_text(data: bytes) -> str:
    """Decode uploaded text, preferring UTF-8 but tolerating legacy exports.

    Spreadsheet CSV exports are frequently Windows-1252, and rejecting them
    would be unhelpful; a NUL byte, on the other hand, means the bytes are not
    text at all. A leading BOM is kept out of the result.
    """
    for bom, encoding in (
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ):
        if data.startswith(bom):
            return data[len(bom) :].decode(encoding)
    if b"\x00" in data:
        raise UnicodeDecodeError(
            "utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte in text"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252")


# --------------------------------------------------------------------------
# Units


def count_units(kind: str, data: bytes, *, name: str = "") -> int:
    """Count the units a document is split over: pages, data rows, or 1.

    ``name`` only matters for tables, where it tells TSV from CSV; the binary
    spreadsheet formats are recognised from the bytes alone.
    """
    if kind == "pdf":
        return len(open_pdf(data).pages)
    if kind == "table":
        return _count_rows(iter_table_rows(_table_format(name, data), data))
    if kind == "text":
        return 1
    raise ValueError(f"unknown document kind {kind!r}; expected one of {', '.join(KINDS)}")


def _count_rows(rows: Iterable[list[str]]) -> int:
    """Data rows of a table: its non-blank rows but the header."""
    return max(0, sum(1 for _ in rows) - 1)


def _table_format(name: str, data: bytes) -> str:
    if data.startswith(_ZIP_MAGIC):
        return "xlsx"
    if data.startswith(_OLE2_MAGIC):
        return "xls"
    return "tsv" if PurePath(name).suffix.lower() in {".tsv", ".tab"} else "csv"


def iter_table_rows(fmt: str, data: bytes) -> Iterator[list[str]]:
    """Yield a table's non-blank rows as strings, header row first.

    Counting (here, at enqueue time) and extraction (in the worker) both go
    through this one function, so "row 3000" means the same row in both places
    and a row window never skips or repeats a row. Blank rows are dropped
    because spreadsheets are full of them and they carry nothing to index.
    """
    if fmt in _DELIMITER:
        yield from _iter_delimited(decode_text(data), _DELIMITER[fmt])
    elif fmt == "xlsx":
        yield from _iter_xlsx(data)
    elif fmt == "xls":
        yield from _iter_xls(data)
    else:
        raise ValueError(f"not a table format: {fmt!r}")


def _iter_delimited(text: str, delimiter: str | None) -> Iterator[list[str]]:
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(text[:8192], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    try:
        for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
            if any(cell.strip() for cell in row):
                yield row
    except csv.Error as exc:
        raise UnsupportedDocument(f"corrupt CSV: {exc}") from None


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _iter_xlsx(data: bytes) -> Iterator[list[str]]:
    """Read every worksheet in order, treating only the first row as a header.

    Workbooks often split one table across sheets; concatenating them keeps
    row numbering simple and stable. Read-only mode streams rows, so a large
    workbook is not materialised in memory just to be counted.
    """
    try:  # deferred: only table documents need it
        from openpyxl import load_workbook
    except ImportError:
        raise missing("openpyxl") from None

    try:
        workbook = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises a wide variety of errors
        raise UnsupportedDocument(f"corrupt xlsx file: {exc}") from None
    try:
        for sheet in workbook.worksheets:
            for values in sheet.iter_rows(values_only=True):
                row = [_cell_text(v) for v in values]
                if any(cell.strip() for cell in row):
                    yield row
    finally:
        workbook.close()


def _iter_xls(data: bytes) -> Iterator[list[str]]:
    """Read legacy Excel files through the optional ``xlrd`` package."""
    try:
        import xlrd  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        raise UnsupportedDocument(
            "reading legacy .xls files needs the optional 'xlrd' package; "
            "install it or save the file as .xlsx"
        ) from None
    try:
        book = xlrd.open_workbook(file_contents=data)
    except Exception as exc:  # xlrd has no common base error
        raise UnsupportedDocument(f"corrupt xls file: {exc}") from None
    for sheet in book.sheets():
        for index in range(sheet.nrows):
            row = [_cell_text(v) for v in sheet.row_values(index)]
            if any(cell.strip() for cell in row):
                yield row


# --------------------------------------------------------------------------
# Ranges

_PAGE_TERM: Final = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_pages(spec: str) -> list[tuple[int, int]]:
    """Parse a ``--pages`` value such as ``"1-20,30-40,45"``.

    Returns 1-based inclusive ``(first, last)`` pairs in the order given, as a
    user would read them back in an error message; normalising (sorting,
    merging, clipping to the document) is :func:`split`'s job because only it
    knows the page count.
    """
    if not spec or not spec.strip():
        raise ValueError("--pages is empty; expected ranges like 1-20,30-40")
    ranges: list[tuple[int, int]] = []
    for term in spec.split(","):
        match = _PAGE_TERM.match(term)
        if match is None:
            raise ValueError(
                f"invalid page range {term.strip()!r} in --pages {spec!r}; expected N or N-M, e.g. 1-20,30"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if first == 0 or last == 0:
            raise ValueError(f"invalid page range {term.strip()!r}: pages are numbered from 1")
        if last < first:
            raise ValueError(f"invalid page range {term.strip()!r}: the end comes before the start")
        ranges.append((first, last))
    return ranges


def split(
    kind: str,
    units: int,
    *,
    parser: str = "general",
    page_size: int | None = None,
    pages: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Cut ``units`` pages or rows into task ranges ``[from_page, to_page)``.

    Ranges are 0-based and half-open like RAGFlow's ``from_page``/``to_page``
    so workers can pass them straight to slicing. Windows bound the work, and
    therefore the retry cost, of any one task: 12 pages by default, 22 for the
    ``paper`` parser whose two-column layout analysis is cheaper per page, the
    whole selection for ``one`` (which must see the document at once), and
    3,000 rows for tables.

    ``pages`` holds 1-based inclusive ranges from :func:`parse_pages`; they
    are clipped to the document, and overlapping or touching ranges are
    merged so that no page is processed twice. Raises ``ValueError`` when
    nothing would be processed, because a job with no tasks could never finish.
    """
    if parser not in PARSERS:
        raise ValueError(f"unknown parser {parser!r}; expected one of {', '.join(PARSERS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown document kind {kind!r}; expected one of {', '.join(KINDS)}")
    if units < 0:
        raise ValueError(f"unit count must not be negative, got {units}")
    if page_size is not None and page_size < 1:
        raise ValueError(f"page size must be at least 1, got {page_size}")
    if pages is not None and kind != "pdf":
        raise ValueError(f"--pages only applies to PDFs, not {kind} documents")

    if kind == "pdf":
        if parser == "one":
            window = math.inf
        elif page_size is not None:
            window = page_size
        else:
            window = PAPER_PAGE_SIZE if parser == "paper" else DEFAULT_PAGE_SIZE
        selected = _select_pages(units, pages)
        tasks = [rng for start, end in selected for rng in _windows(start, end, window)]
        if not tasks:
            if pages is not None:
                raise ValueError(f"--pages selects no pages: the document has {units} page(s)")
            raise ValueError("the PDF has no pages")
        return tasks

    if kind == "table" or parser == "table":
        if units == 0:
            raise ValueError("the table has no data rows")
        return _windows(0, units, TABLE_ROWS_PER_TASK)

    return [(0, units)]


def _select_pages(units: int, pages: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """Turn 1-based inclusive selections into sorted, disjoint 0-based spans."""
    if pages is None:
        return [(0, units)] if units > 0 else []
    spans: list[tuple[int, int]] = []
    for first, last in pages:
        if first < 1 or last < first:
            raise ValueError(f"invalid page range {first}-{last}")
        start, end = first - 1, min(last, units)  # inclusive 1-based end == exclusive 0-based end
        if start < end:
            spans.append((start, end))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _windows(start: int, end: int, size: float) -> list[tuple[int, int]]:
    if size == math.inf:
        return [(start, end)] if start < end else []
    step = int(size)
    return [(lo, min(lo + step, end)) for lo in range(start, end, step)]
