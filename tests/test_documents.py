"""Documents through enqueue: splitting, bad files, size limits, digest reuse, roll-up views."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import REPO, BackgroundWorker, jobq_cli, wait_for

from jobq_workers.documents import enqueue_files

SAMPLES = REPO / "examples" / "samples"
HANDBOOK = str(SAMPLES / "handbook.pdf")
INVENTORY = str(SAMPLES / "inventory.csv")
GUIDE = str(SAMPLES / "guide.md")


@pytest.fixture
def fresh(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("TRUNCATE tasks, documents, batches, chunks, workers "
                 "RESTART IDENTITY CASCADE")
    return conn


def ranges(conn: psycopg.Connection[Any], doc_id: int) -> list[tuple[int, int]]:
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT from_page, to_page FROM tasks WHERE doc_id = %s AND type = 'dataflow' ORDER BY from_page",
        (doc_id,)).fetchall()]


def finish(conn: psycopg.Connection[Any], doc_ids: list[int]) -> None:
    with BackgroundWorker(["dataflow", "raptor"], concurrency=4, poll_seconds=0.2):
        wait_for(lambda: conn.execute(
            "SELECT bool_and(status IN ('done', 'failed', 'cancelled')) FROM document_progress "
            "WHERE doc_id = ANY(%s)", (doc_ids,)).fetchone()[0], timeout=60)


def test_every_page_lands_in_exactly_one_task(fresh: psycopg.Connection[Any]) -> None:
    res = enqueue_files([HANDBOOK, INVENTORY, GUIDE])
    pdf, csv, md = (f.doc_id for f in res.files)
    assert ranges(fresh, pdf) == [(0, 12), (12, 24), (24, 36), (36, 37)]
    assert ranges(fresh, csv) == [(0, 3000), (3000, 6000), (6000, 7000)]
    assert ranges(fresh, md) == [(0, 1)]
    pages = [p for lo, hi in ranges(fresh, pdf) for p in range(lo, hi)]
    assert sorted(pages) == list(range(37))
    row = fresh.execute("SELECT name, format, kind, pages, size, content IS NOT NULL, batch_id FROM documents "
                        "WHERE id = %s", (pdf,)).fetchone()
    assert row == ("handbook.pdf", "pdf", "pdf", 37, Path(HANDBOOK).stat().st_size, True, res.batch_id)
    assert fresh.execute("SELECT files, processed, requested, rejected FROM batch_progress WHERE batch_id = %s",
                         (res.batch_id,)).fetchone() == (3, 0, 3, 0)


def test_pages_option_through_the_cli_keeps_the_last_page(fresh: psycopg.Connection[Any]) -> None:
    r = jobq_cli("enqueue", HANDBOOK, "--pages", "1-20,30-37", "--page-size", "5", "--priority", "3",
                 "--owner", "ann")
    assert r.returncode == 0, r.stderr
    doc_id = fresh.execute("SELECT id FROM documents").fetchone()[0]
    assert ranges(fresh, doc_id) == [(0, 5), (5, 10), (10, 15), (15, 20), (29, 34), (34, 37)]
    covered = sorted(p for lo, hi in ranges(fresh, doc_id) for p in range(lo, hi))
    assert covered == [*range(0, 20), *range(29, 37)]  # page 37 (index 36) included, 21-29 not
    assert fresh.execute("SELECT DISTINCT priority, owner FROM tasks").fetchall() == [(3, "ann")]
    assert f"document {doc_id}, 6 task(s)" in r.stdout


def test_bad_files_get_one_line_each_and_leave_no_row(fresh: psycopg.Connection[Any], tmp_path: Path) -> None:
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    fake = tmp_path / "page.pdf"
    fake.write_text("<html><body>Not found</body></html>")
    bad = {
        "empty.pdf": str(empty),
        "encrypted.pdf": str(REPO / "tests" / "data" / "encrypted.pdf"),
        "truncated.pdf": str(REPO / "tests" / "data" / "truncated.pdf"),
        "page.pdf": str(fake),
        "missing.pdf": str(tmp_path / "missing.pdf"),
    }
    r = jobq_cli("enqueue", bad["empty.pdf"], GUIDE, bad["encrypted.pdf"], bad["truncated.pdf"], bad["page.pdf"],
                 bad["missing.pdf"])
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == len(bad), r.stderr
    for name, line in zip(bad, lines, strict=True):
        assert line.startswith("error: ") and name in line, line
    assert "encrypted" in lines[1] and "no such file" in lines[4] and "zero bytes" in lines[0]
    assert "guide.md: document 1" in r.stdout
    assert fresh.execute("SELECT name FROM documents").fetchall() == [("guide.md",)]
    assert fresh.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1
    assert fresh.execute("SELECT requested, rejected FROM batches").fetchone() == (6, 5)


def test_size_limit_in_python_and_in_the_database(fresh: psycopg.Connection[Any]) -> None:
    r = jobq_cli("enqueue", HANDBOOK, env={"JOBQ_MAX_DOCUMENT_BYTES": "1000"})
    assert r.returncode == 1
    assert "over the limit of 1000 bytes" in r.stderr and "--by-reference" in r.stderr
    r = jobq_cli("enqueue", HANDBOOK, "--by-reference", env={"JOBQ_MAX_DOCUMENT_BYTES": "1000"})
    assert r.returncode == 0, r.stderr
    assert fresh.execute("SELECT content IS NULL, uri FROM documents").fetchone() == (True, HANDBOOK)
    with pytest.raises(psycopg.errors.CheckViolation, match="documents_size_limit"):
        fresh.execute("INSERT INTO documents (name, size, format, kind, parser, pages, content_digest, content) "
                      "SELECT 'big', 104857601, 'txt', 'text', 'general', 1, 'x', "
                      "convert_to(repeat('a', 104857601), 'UTF8')")


def test_unchanged_document_reuses_its_chunks_and_force_reprocesses(fresh: psycopg.Connection[Any]) -> None:
    first = enqueue_files([HANDBOOK])
    doc = first.files[0].doc_id
    assert doc is not None
    finish(fresh, [doc])
    before = fresh.execute("SELECT array_agg(id ORDER BY id) FROM chunks WHERE doc_id = %s", (doc,)).fetchone()[0]
    assert len(before) > 10

    again_batch = enqueue_files([HANDBOOK])
    again = again_batch.files[0]
    assert (again.doc_id, again.reused, again.queued) == (doc, 4, 0)
    tasks = fresh.execute("SELECT id, status, progress, progress_msg FROM tasks WHERE doc_id = %s "
                          "AND superseded_at IS NULL ORDER BY id", (doc,)).fetchall()
    assert [t[0] for t in tasks] == again.tasks
    # The first run's tasks stay as history, marked superseded by the new batch.
    history = fresh.execute("SELECT array_agg(id ORDER BY id), array_agg(DISTINCT superseded_by) FROM tasks "
                            "WHERE doc_id = %s AND superseded_at IS NOT NULL", (doc,)).fetchone()
    assert history == (first.files[0].tasks, [again_batch.batch_id])
    assert all(t[1] == "done" and t[2] == 1 and "Reused" in t[3] for t in tasks)
    after = fresh.execute("SELECT array_agg(id ORDER BY id), array_agg(DISTINCT task_id) FROM chunks "
                          "WHERE doc_id = %s", (doc,)).fetchone()
    assert after[0] == before and sorted(after[1]) == again.tasks
    assert fresh.execute("SELECT status, progress FROM document_progress WHERE doc_id = %s",
                         (doc,)).fetchone() == ("done", 1.0)

    # A narrower selection keeps the first two windows and changes the third: only that one runs.
    partial = enqueue_files([HANDBOOK], page_size=12, pages="1-12,13-30").files[0]
    assert (partial.reused, partial.queued) == (2, 1)
    assert fresh.execute("SELECT count(*) FROM chunks WHERE doc_id = %s AND from_page >= 30",
                         (doc,)).fetchone()[0] == 0  # pages no longer selected lost their chunks
    finish(fresh, [doc])

    forced = enqueue_files([HANDBOOK], force=True).files[0]
    assert (forced.reused, forced.queued) == (0, 4)
    assert fresh.execute("SELECT count(*) FROM chunks WHERE doc_id = %s", (doc,)).fetchone()[0] == 0
    finish(fresh, [doc])
    final = fresh.execute("SELECT array_agg(id ORDER BY id) FROM chunks WHERE doc_id = %s", (doc,)).fetchone()[0]
    assert len(final) == len(before) and not set(final) & set(before)


def test_reenqueue_while_processing_is_refused(fresh: psycopg.Connection[Any]) -> None:
    doc = enqueue_files([GUIDE]).files[0].doc_id
    res = enqueue_files([GUIDE]).files[0]
    assert res.error is not None and f"document {doc}" in res.error and "still being processed" in res.error
    assert fresh.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1


def test_document_status_rules(fresh: psycopg.Connection[Any]) -> None:
    res = enqueue_files([HANDBOOK, GUIDE])
    pdf, md = (f.doc_id for f in res.files)

    def state(doc: int | None) -> tuple[str, float]:
        row = fresh.execute("SELECT status, progress FROM document_progress WHERE doc_id = %s",
                            (doc,)).fetchone()
        return row[0], round(row[1], 3)

    def task_set(doc: int | None, n: int, status: str, progress: float) -> None:
        fresh.execute("UPDATE tasks SET status = %s, progress = %s, "
                      "finished_at = CASE WHEN %s IN ('done', 'failed', 'cancelled') THEN now() END, "
                      "started_at = now() WHERE id = (SELECT id FROM tasks WHERE doc_id = %s "
                      "ORDER BY id OFFSET %s LIMIT 1)", (status, progress, status, doc, n))

    assert state(pdf) == ("queued", 0)
    task_set(pdf, 0, "running", 0.5)
    assert state(pdf) == ("running", 0.125)
    task_set(pdf, 0, "failed", -1)
    assert state(pdf) == ("running", 0)  # failed only once every task finished
    for n in (1, 2, 3):
        task_set(pdf, n, "done", 1)
    assert state(pdf) == ("failed", 0.75)
    task_set(md, 0, "cancelled", 0)
    assert state(md) == ("cancelled", 0)
    assert fresh.execute("SELECT files, processed, succeeded, failed, cancelled FROM batch_progress "
                         "WHERE batch_id = %s", (res.batch_id,)).fetchone() == (2, 2, 0, 1, 1)
    task_set(pdf, 0, "done", 1)
    assert state(pdf) == ("done", 1)


def test_queue_position_follows_the_claim_order(fresh: psycopg.Connection[Any]) -> None:
    res = enqueue_files([HANDBOOK, INVENTORY], priority=0)
    urgent = enqueue_files([GUIDE], priority=5)
    fresh.execute("UPDATE tasks SET run_at = now() + interval '1 hour' WHERE from_page = 24")  # not runnable
    order = [r[0] for r in fresh.execute(
        "SELECT id FROM tasks WHERE status = 'queued' AND run_at <= now() "
        "ORDER BY priority DESC, run_at, id").fetchall()]
    positions = dict(fresh.execute(
        "SELECT id, queue_position(id) FROM tasks WHERE run_at <= now()").fetchall())
    assert [positions[i] for i in order] == list(range(len(order)))
    assert positions[urgent.files[0].tasks[0]] == 0
    docs = dict(fresh.execute("SELECT doc_id, queue_position FROM document_progress").fetchall())
    assert docs[res.files[0].doc_id] == 1 and docs[res.files[1].doc_id] == 4
    fresh.execute("UPDATE tasks SET status = 'running' WHERE id = %s", (order[0],))
    assert fresh.execute("SELECT queue_position(%s), queue_position(%s)",
                         (order[0], order[1])).fetchone() == (None, 0)


def test_docs_command_lists_documents(fresh: psycopg.Connection[Any]) -> None:
    enqueue_files([GUIDE, HANDBOOK])
    r = jobq_cli("docs")
    assert r.returncode == 0, r.stderr
    assert "guide.md" in r.stdout and "handbook.pdf" in r.stdout and "queued" in r.stdout
    assert jobq_cli("docs", "--status", "nope").returncode == 1


def test_enqueue_parses_each_pdf_once(fresh: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection, validation, page counting and splitting share one parse (it used to be three)."""
    from jobq_workers import splitter

    opened: list[int] = []
    real = splitter.open_pdf

    def counting(data: bytes) -> Any:
        opened.append(len(data))
        return real(data)

    monkeypatch.setattr(splitter, "open_pdf", counting)
    res = enqueue_files([HANDBOOK, INVENTORY])
    assert not res.errors and len(res.doc_ids) == 2
    assert opened == [Path(HANDBOOK).stat().st_size]


# A light install (`pip install jobq`, no [documents] extra): these packages cannot be imported.
DOCUMENT_STACK = ("pypdf", "openpyxl", "numpy", "sklearn", "docx")
_LIGHT = ("import sys; sys.modules.update(dict.fromkeys({stack!r})); sys.argv[0] = 'jobq'; {code}")


def light(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where the document stack is missing."""
    return subprocess.run([sys.executable, "-c", _LIGHT.format(stack=DOCUMENT_STACK, code=code), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_enqueue_without_the_documents_extra_says_what_to_install(fresh: psycopg.Connection[Any]) -> None:
    r = light("from jobqueue.cli import main; main()", "enqueue", HANDBOOK)
    assert r.returncode == 1
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "pip install 'jobq[documents]'" in r.stderr and "Traceback" not in r.stderr
    assert fresh.execute("SELECT count(*) FROM documents").fetchone()[0] == 0


def test_handlers_and_queue_import_without_the_documents_extra() -> None:
    """Producers import the handler modules (entry points) to validate types; only running them needs the stack."""
    loaded = f"sorted(m for m in sys.modules if m.split('.')[0] in {DOCUMENT_STACK!r} and sys.modules[m])"
    r = light("import jobqueue, jobqueue.cli, jobq_workers.documents, jobq_workers.watch; "
              "from jobqueue import registry; registry.get_type('dataflow'); registry.get_type('raptor'); "
              f"print({loaded})")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_worker_without_the_extra_names_it_instead_of_a_bare_import_error() -> None:
    r = light("from jobq_workers import splitter; from jobq_workers.extras import MissingExtra\n"
              "try:\n"
              f"    splitter.inspect('handbook.pdf', open({HANDBOOK!r}, 'rb').read())\n"
              "except MissingExtra as exc:\n"
              "    print(exc)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "pypdf is not installed (the [documents] extra): pip install 'jobq[documents]'"
