"""A long, manual-like PDF for the RAPTOR quality tests, generated on the fly with fpdf2.

The committed handbook is clean prose; real manuals are not. This one has what tripped the tree up
on real documents: a title page, a table of contents of dotted leaders and page numbers, running
footers, one-word section headings, tables whose rows have no sentence punctuation, and pages that
hold nothing but their page number. The prose comes from the handbook's sentence banks
(examples/make_samples.py), so the chapters have real topics to cluster.
"""

from __future__ import annotations

import importlib.util
import random
from functools import cache

from fpdf import FPDF
from support import REPO

SEED = 20261203


@cache
def _topics() -> dict[str, list[str]]:
    spec = importlib.util.spec_from_file_location("make_samples", REPO / "examples" / "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    topics: dict[str, list[str]] = module.TOPICS
    return topics


def manual_pdf(pages_per_chapter: int = 10) -> bytes:
    """About ``9 * (pages_per_chapter + 2) + 4`` pages; the same bytes on every call."""
    rng = random.Random(SEED)
    topics = _topics()
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=False)
    page_no = 0

    def footer() -> None:
        pdf.set_y(-20)
        pdf.set_font("Helvetica", style="I", size=9)
        pdf.cell(0, 6, f"Operator manual - {page_no}", align="C")

    def new_page() -> None:
        nonlocal page_no
        pdf.add_page()
        page_no += 1

    new_page()
    pdf.set_font("Helvetica", style="B", size=24)
    pdf.multi_cell(0, 14, "Operator Manual\n\nRevision 7")
    footer()
    # Three pages of contents: entries with dotted leaders and page numbers, nothing else.
    entries = [(f"{c}. {name}, section {s}", 5 + c * 12 + s) for c, name in enumerate(topics, 1) for s in range(1, 9)]
    per_page = len(entries) // 3 + 1
    for start in range(0, len(entries), per_page):
        new_page()
        pdf.set_font("Helvetica", size=10)
        for title, number in entries[start : start + per_page]:
            pdf.cell(0, 6, f"{title} {'.' * (70 - len(title))} {number}", new_x="LMARGIN", new_y="NEXT")
        footer()
    for chapter, (name, bank) in enumerate(topics.items(), 1):
        for part in range(pages_per_chapter):
            new_page()
            pdf.set_font("Helvetica", style="B", size=14)
            pdf.multi_cell(0, 8, name.split()[0] if part % 3 == 0 else f"{chapter}.{part + 1} {name}")
            pdf.ln(3)
            pdf.set_font("Helvetica", size=11)
            for _ in range(rng.choice((2, 3))):
                pdf.multi_cell(0, 6, " ".join(rng.sample(bank, rng.randint(3, 5))))
                pdf.ln(4)
            footer()
        new_page()  # a table: rows of cells, no sentence punctuation at all
        pdf.set_font("Helvetica", size=9)
        for row in range(40):
            words = rng.sample(bank, 3)
            cells = [w.split()[rng.randrange(4)] for w in words]
            pdf.cell(0, 5, f"{chapter}-{row:03d}   {'   '.join(cells)}   {rng.randint(1, 999)}   {rng.random():.3f}",
                     new_x="LMARGIN", new_y="NEXT")
        footer()
        new_page()  # intentionally left blank but for its number
        footer()
    return bytes(pdf.output())
