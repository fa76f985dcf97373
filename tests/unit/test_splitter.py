"""Splitting documents into tasks: detection, unit counting and page windows."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openpyxl import Workbook
from pypdf import PdfReader, PdfWriter

from jobq_workers.splitter import (
    TABLE_ROWS_PER_TASK,
    UnsupportedDocument,
    content_digest,
    count_units,
    detect_format,
    detect_kind,
    inspect,
    parse_pages,
    split,
    task_digest,
)

PAGES = 37


def _xlsx(rows: list[list[object]]) -> bytes:
    workbook = Workbook()
    sheet = workbook.active
    assert sheet is not None
    for row in rows:
        sheet.append(row)
    buf = io.BytesIO()
    workbook.save(buf)
    return buf.getvalue()


def _covered(ranges: list[tuple[int, int]]) -> Counter[int]:
    return Counter(page for lo, hi in ranges for page in range(lo, hi))


def _selected(spec: str | None, units: int) -> set[int]:
    """Independent oracle: the 0-based pages a --pages spec asks for."""
    if spec is None:
        return set(range(units))
    pages: set[int] = set()
    for first, last in parse_pages(spec):
        pages.update(p - 1 for p in range(first, last + 1) if p <= units)
    return pages


# -- detection ---------------------------------------------------------------


def test_inspect_agrees_with_detection_and_counting(handbook_pdf: bytes, inventory_csv: bytes,
                                                    guide_md: bytes) -> None:
    """The one-parse path used at enqueue gives what the separate functions give."""
    samples = {"handbook.pdf": handbook_pdf, "inventory.csv": inventory_csv, "guide.md": guide_md,
               "sheet.xlsx": _xlsx([["a", "b"], [1, 2], [3, 4]])}
    for name, data in samples.items():
        layout = inspect(name, data)
        kind = detect_kind(name, data)
        assert (layout.format, layout.kind, layout.units) == (detect_format(name, data), kind,
                                                              count_units(kind, data, name=name))
    assert inspect("handbook.pdf", handbook_pdf).units == PAGES


def test_inspect_decodes_a_table_once(inventory_csv: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobq_workers import splitter

    decoded: list[int] = []
    real = splitter.decode_text

    def counting(data: bytes) -> str:
        decoded.append(len(data))
        return real(data)

    monkeypatch.setattr(splitter, "decode_text", counting)
    assert inspect("inventory.csv", inventory_csv).units == 7000
    assert decoded == [len(inventory_csv)]


def test_detects_the_sample_kinds(handbook_pdf: bytes, inventory_csv: bytes, guide_md: bytes) -> None:
    assert detect_kind("handbook.pdf", handbook_pdf) == "pdf"
    assert detect_kind("inventory.csv", inventory_csv) == "table"
    assert detect_kind("guide.md", guide_md) == "text"
    assert detect_format("guide.md", guide_md) == "md"


def test_magic_bytes_beat_the_extension(handbook_pdf: bytes) -> None:
    assert detect_kind("report.txt", handbook_pdf) == "pdf"
    assert detect_kind("noext", _xlsx([["a"], [1]])) == "table"
    assert detect_format("page.csv", b"<!DOCTYPE html><html><body>hi</body></html>") == "html"
    assert detect_format("page.txt", b"\xef\xbb\xbf<html><p>hi</p></html>") == "html"
    assert detect_kind("data.tsv", b"a\tb\n1\t2\n") == "table"


def test_zero_byte_file_is_rejected() -> None:
    with pytest.raises(UnsupportedDocument, match="empty file"):
        detect_kind("empty.pdf", b"")


def test_encrypted_pdf_is_rejected(encrypted_pdf: bytes) -> None:
    with pytest.raises(UnsupportedDocument) as info:
        detect_kind("secret.pdf", encrypted_pdf)
    assert str(info.value) == "encrypted PDF is not supported"


def test_owner_password_only_pdf_is_accepted(handbook_pdf: bytes) -> None:
    """Permission-restricted PDFs open with an empty user password."""
    writer = PdfWriter()
    writer.add_page(PdfReader(io.BytesIO(handbook_pdf)).pages[0])
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    assert detect_kind("restricted.pdf", buf.getvalue()) == "pdf"
    assert count_units("pdf", buf.getvalue()) == 1


def test_truncated_pdf_is_corrupt(truncated_pdf: bytes) -> None:
    with pytest.raises(UnsupportedDocument, match=r"^corrupt PDF: ") as info:
        detect_kind("cut.pdf", truncated_pdf)
    assert "\n" not in str(info.value)


def test_non_pdf_named_pdf_is_corrupt() -> None:
    with pytest.raises(UnsupportedDocument, match=r"^corrupt PDF"):
        detect_kind("invoice.pdf", b"<html><body>404 Not Found</body></html>")


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("photo.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 32, "PNG image"),
        ("archive.zip", b"PK\x03\x04garbage", "corrupt zip"),
        ("book.xlsx", b"PK\x03\x04garbage", "corrupt xlsx"),
        ("legacy.docx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 64, "legacy or encrypted Office"),
        ("blob.bin", bytes(range(256)), "binary"),
        ("noise.txt", bytes(range(1, 128)) * 4, "binary"),
        ("blank.txt", b" \n\n \t\n", "blank"),
        ("script.exe", b"print('hi')\n", "unsupported document type '.exe'"),
        ("sheet.xlsx", b"just words\n", "plain text, not a xlsx"),
    ],
)
def test_unsupported_documents_have_one_line_reasons(name: str, data: bytes, message: str) -> None:
    with pytest.raises(UnsupportedDocument, match=message) as info:
        detect_kind(name, data)
    assert "\n" not in str(info.value)


def test_zip_without_office_parts_is_not_a_spreadsheet() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(UnsupportedDocument, match="zip archive"):
        detect_kind("files.zip", buf.getvalue())


# -- unit counting -----------------------------------------------------------


def test_counts_units(handbook_pdf: bytes, inventory_csv: bytes, guide_md: bytes) -> None:
    assert count_units("pdf", handbook_pdf) == PAGES
    assert count_units("table", inventory_csv, name="inventory.csv") == 7000
    assert count_units("text", guide_md) == 1


def test_counts_xlsx_data_rows_skipping_blank_rows() -> None:
    data = _xlsx([["name", "qty"], ["a", 1], [None, None], ["b", 2], ["c", None]])
    assert count_units("table", data) == 3


def test_counts_csv_rows_with_embedded_newlines() -> None:
    data = b'id,note\n1,"two\nlines"\n\n2,plain\n'
    assert count_units("table", data, name="notes.csv") == 2


def test_count_units_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown document kind"):
        count_units("video", b"x")


# -- --pages parsing ---------------------------------------------------------


def test_parse_pages() -> None:
    assert parse_pages("1-20,30-40") == [(1, 20), (30, 40)]
    assert parse_pages("5") == [(5, 5)]
    assert parse_pages(" 3 - 4 , 9 ") == [(3, 4), (9, 9)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("abc", "invalid page range 'abc'"),
        ("1-", "invalid page range"),
        ("-3", "invalid page range"),
        ("1,,2", "invalid page range"),
        ("1-2-3", "invalid page range"),
        ("2.5", "invalid page range"),
        ("9-3", "end comes before the start"),
        ("0", "numbered from 1"),
        ("0-4", "numbered from 1"),
    ],
)
def test_parse_pages_rejects_garbage(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pages(spec)


# -- splitting ---------------------------------------------------------------


def test_default_windows_keep_the_last_page() -> None:
    assert split("pdf", PAGES) == [(0, 12), (12, 24), (24, 36), (36, 37)]


def test_range_ending_at_the_page_count_keeps_the_last_page() -> None:
    """RAGFlow's min(e - 1, pages) would end this at 36 and drop page 37."""
    assert split("pdf", PAGES, pages=parse_pages("30-37")) == [(29, 37)]
    assert split("pdf", PAGES, pages=parse_pages("37")) == [(36, 37)]


def test_paper_parser_defaults_to_22_pages() -> None:
    assert split("pdf", PAGES, parser="paper") == [(0, 22), (22, 37)]
    assert split("pdf", PAGES, parser="paper", page_size=10) == [(0, 10), (10, 20), (20, 30), (30, 37)]


def test_one_parser_is_one_task_per_selection() -> None:
    assert split("pdf", PAGES, parser="one") == [(0, 37)]
    assert split("pdf", PAGES, parser="one", page_size=5) == [(0, 37)]
    assert split("pdf", PAGES, parser="one", pages=parse_pages("1-5,10-12")) == [(0, 5), (9, 12)]


def test_pages_are_clipped_and_beyond_the_end_dropped() -> None:
    assert split("pdf", PAGES, pages=parse_pages("30-100,50-60")) == [(29, 37)]
    with pytest.raises(ValueError, match="selects no pages"):
        split("pdf", PAGES, pages=parse_pages("38-40"))


def test_overlapping_page_ranges_are_merged() -> None:
    assert split("pdf", PAGES, pages=parse_pages("10-20,5-12,21-22")) == [(4, 16), (16, 22)]


@pytest.mark.parametrize("page_size", [None, 1, 5, 12, 22, 36, 37, 100])
@pytest.mark.parametrize("spec", [None, "1-37", "1-20,30-40", "37", "1,37", "5-10,8-15", "2-3,3-4,36-99"])
@pytest.mark.parametrize("parser", ["general", "paper", "book", "one"])
def test_every_selected_page_lands_in_exactly_one_range(
    page_size: int | None, spec: str | None, parser: str
) -> None:
    pages = parse_pages(spec) if spec is not None else None
    ranges = split("pdf", PAGES, parser=parser, page_size=page_size, pages=pages)
    covered = _covered(ranges)
    assert set(covered) == _selected(spec, PAGES)
    assert set(covered.values()) == {1}
    assert ranges == sorted(ranges)
    window = PAGES if parser == "one" else (page_size or (22 if parser == "paper" else 12))
    assert all(0 <= lo < hi <= PAGES and hi - lo <= window for lo, hi in ranges)


@given(
    units=st.integers(min_value=1, max_value=400),
    page_size=st.integers(min_value=1, max_value=50),
    terms=st.lists(st.tuples(st.integers(1, 450), st.integers(0, 60)), min_size=1, max_size=6),
)
def test_split_partitions_any_selection(units: int, page_size: int, terms: list[tuple[int, int]]) -> None:
    spec = ",".join(f"{first}-{first + extra}" for first, extra in terms)
    wanted = _selected(spec, units)
    if not wanted:
        with pytest.raises(ValueError):
            split("pdf", units, page_size=page_size, pages=parse_pages(spec))
        return
    ranges = split("pdf", units, page_size=page_size, pages=parse_pages(spec))
    covered = _covered(ranges)
    assert set(covered) == wanted
    assert max(covered.values()) == 1
    assert all(hi - lo <= page_size for lo, hi in ranges)


def test_tables_split_into_3000_row_windows() -> None:
    assert TABLE_ROWS_PER_TASK == 3000
    assert split("table", 7000) == [(0, 3000), (3000, 6000), (6000, 7000)]
    assert split("table", 3000, parser="table") == [(0, 3000)]
    assert split("table", 3001) == [(0, 3000), (3000, 3001)]
    # page_size is a PDF setting and does not change table windows.
    assert split("table", 7000, page_size=5) == [(0, 3000), (3000, 6000), (6000, 7000)]


def test_text_is_a_single_task() -> None:
    assert split("text", 1) == [(0, 1)]
    assert split("text", 1, parser="one") == [(0, 1)]
    assert split("text", 1, parser="table") == [(0, 1)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "pdf", "units": 37, "parser": "laws"}, "unknown parser 'laws'"),
        ({"kind": "image", "units": 1}, "unknown document kind"),
        ({"kind": "pdf", "units": 37, "page_size": 0}, "page size must be at least 1"),
        ({"kind": "pdf", "units": -1}, "must not be negative"),
        ({"kind": "table", "units": 100, "pages": [(1, 2)]}, "only applies to PDFs"),
        ({"kind": "table", "units": 0}, "no data rows"),
        ({"kind": "pdf", "units": 0}, "no pages"),
    ],
)
def test_split_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split(**kwargs)  # type: ignore[arg-type]


# -- digests -----------------------------------------------------------------


def test_content_digest_is_sha256(handbook_pdf: bytes) -> None:
    assert content_digest(handbook_pdf) == hashlib.sha256(handbook_pdf).hexdigest()


def test_task_digest_is_canonical_and_sensitive() -> None:
    base = task_digest("abc", {"parser": "general", "page_size": 12}, 0, 12)
    assert len(base) == 64
    assert base == task_digest("abc", {"page_size": 12, "parser": "general"}, 0, 12)
    variants = {
        task_digest("abd", {"parser": "general", "page_size": 12}, 0, 12),
        task_digest("abc", {"parser": "paper", "page_size": 12}, 0, 12),
        task_digest("abc", {"parser": "general", "page_size": 12}, 12, 24),
        task_digest("abc", {"parser": "general", "page_size": 12}, 0, 13),
    }
    assert base not in variants
    assert len(variants) == 4


def test_task_digest_rejects_non_json_settings() -> None:
    with pytest.raises(ValueError, match="plain JSON"):
        task_digest("abc", {"when": object()}, 0, 1)
    with pytest.raises(ValueError, match="plain JSON"):
        task_digest("abc", {"x": float("nan")}, 0, 1)
