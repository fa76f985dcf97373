"""Text extraction for a task's page or row range."""

from __future__ import annotations

import io
import sys
from collections import Counter

import pytest
from openpyxl import Workbook

from jobq_workers.extract import Segment, extract, html_to_text, iter_extract
from jobq_workers.splitter import UnsupportedDocument, count_units, detect_kind, split


def test_pdf_pages_in_range(handbook_pdf: bytes) -> None:
    segments = extract("pdf", "handbook.pdf", handbook_pdf, 12, 24)
    assert [s.index for s in segments] == list(range(12, 24))
    # Each sample page starts with its topic heading and ends with a footer.
    for segment in segments:
        assert segment.text.rstrip().endswith(f"Page {segment.index + 1} of 37")
    first = extract("pdf", "handbook.pdf", handbook_pdf, 0, 1)
    assert first[0].text.startswith("Beekeeping, part 1")


def test_pdf_keeps_paragraph_breaks_without_layout_padding(handbook_pdf: bytes) -> None:
    [page] = extract("pdf", "handbook.pdf", handbook_pdf, 0, 1)
    paragraphs = page.text.split("\n\n")
    assert len(paragraphs) >= 3  # heading, at least two paragraphs, footer
    assert "  " not in page.text


def test_pdf_range_is_clipped_to_the_document(handbook_pdf: bytes) -> None:
    assert [s.index for s in extract("pdf", "h.pdf", handbook_pdf, 35, 99)] == [35, 36]
    assert extract("pdf", "h.pdf", handbook_pdf, 40, 50) == []


def test_iter_extract_yields_one_page_at_a_time(handbook_pdf: bytes) -> None:
    pages = iter_extract("pdf", "handbook.pdf", handbook_pdf, 3, 30)
    assert next(pages).index == 3
    assert next(pages).index == 4
    pages.close()


def test_every_csv_row_is_extracted_once_across_tasks(inventory_csv: bytes) -> None:
    units = count_units("table", inventory_csv, name="inventory.csv")
    seen: Counter[int] = Counter()
    for lo, hi in split("table", units):
        for segment in iter_extract("table", "inventory.csv", inventory_csv, lo, hi):
            seen[segment.index] += 1
    assert set(seen) == set(range(7000))
    assert set(seen.values()) == {1}


def test_csv_rows_render_as_column_value_pairs(inventory_csv: bytes) -> None:
    [row] = extract("table", "inventory.csv", inventory_csv, 2999, 3000)
    assert row.index == 2999
    assert row.text.startswith("sku: SKU-02999; city: ")
    assert [part.split(": ")[0] for part in row.text.split("; ")] == [
        "sku",
        "city",
        "product",
        "quantity",
        "unit_price",
        "restocked",
    ]


def test_xlsx_rows_skip_empty_cells_and_blank_rows() -> None:
    workbook = Workbook()
    sheet = workbook.active
    assert sheet is not None
    rows: list[list[str | int | None]] = [
        ["name", "qty", None],
        ["apple", 3, None],
        [None, None, None],
        ["pear", None, "ripe"],
    ]
    for row in rows:
        sheet.append(row)
    buf = io.BytesIO()
    workbook.save(buf)
    data = buf.getvalue()
    assert count_units("table", data) == 2
    assert extract("table", "fruit.xlsx", data, 0, 2) == [
        Segment(0, "name: apple; qty: 3"),
        Segment(1, "name: pear; column 3: ripe"),
    ]


def test_tsv_uses_tabs() -> None:
    data = b"city\tnote\nOslo\tcold, windy\n"
    assert extract("table", "notes.tsv", data, 0, 1) == [Segment(0, "city: Oslo; note: cold, windy")]


def test_markdown_is_returned_as_is(guide_md: bytes) -> None:
    [segment] = extract("text", "guide.md", guide_md, 0, 1)
    assert segment == Segment(0, guide_md.decode("utf-8"))


def test_text_outside_its_single_unit_is_empty(guide_md: bytes) -> None:
    assert extract("text", "guide.md", guide_md, 1, 2) == []


def test_html_strips_tags_scripts_and_styles() -> None:
    html = """<!doctype html><html><head><title>T</title><style>p { color: red }</style></head>
    <body><script>var secret = 1;</script>
    <h1>Tides</h1>
    <p>The Moon pulls
       the sea &amp; the Sun helps.</p>
    <p>Line one<br>line two</p>
    <table><tr><td>a</td><td>b</td></tr></table>
    </body></html>"""
    text = html_to_text(html)
    assert text == "Tides\n\nThe Moon pulls the sea & the Sun helps.\n\nLine one\nline two\n\na | b"
    [segment] = extract("text", "page.html", html.encode(), 0, 1)
    assert segment.text == text


def test_docx_paragraphs_and_tables() -> None:
    docx = pytest.importorskip("docx")
    document = docx.Document()
    document.add_paragraph("First paragraph.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "left"
    table.rows[0].cells[1].text = "right"
    document.add_paragraph("Last paragraph.")
    buf = io.BytesIO()
    document.save(buf)
    data = buf.getvalue()
    assert detect_kind("memo.docx", data) == "text"
    assert extract("text", "memo.docx", data, 0, 1) == [
        Segment(0, "First paragraph.\n\nleft | right\n\nLast paragraph.")
    ]


def test_docx_without_python_docx_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    docx = pytest.importorskip("docx")
    document = docx.Document()
    document.add_paragraph("Hello.")
    buf = io.BytesIO()
    document.save(buf)
    monkeypatch.setitem(sys.modules, "docx", None)  # makes ``import docx`` fail
    with pytest.raises(UnsupportedDocument, match="python-docx"):
        extract("text", "memo.docx", buf.getvalue(), 0, 1)


def test_kind_must_match_the_content(handbook_pdf: bytes) -> None:
    with pytest.raises(ValueError, match="cannot be extracted as kind 'table'"):
        extract("table", "handbook.pdf", handbook_pdf, 0, 1)


def test_invalid_range() -> None:
    with pytest.raises(ValueError, match="invalid unit range"):
        extract("text", "a.txt", b"hello", 2, 1)


def test_encrypted_pdf_cannot_be_extracted(encrypted_pdf: bytes) -> None:
    with pytest.raises(UnsupportedDocument, match="encrypted"):
        extract("pdf", "secret.pdf", encrypted_pdf, 0, 1)
