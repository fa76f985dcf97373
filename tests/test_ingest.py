"""The public document API (jobq_workers.enqueue_document(s), wait_document, their async twins).

They run the code `jobq enqueue FILE...` runs, so these tests check the API's own part (bytes with a
name, one document's refusal as an error, the batch form's per-file results, waiting) and that the
rules are the CLI's: the same refusal line for the same file.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from support import REPO, SAMPLES, TEST_DATA, BackgroundWorker, jobq_cli

import jobq_workers
from jobq_workers import (
    DocumentFailed,
    enqueue_document,
    enqueue_document_async,
    enqueue_documents,
    enqueue_documents_async,
    wait_document,
    wait_document_async,
)
from jobqueue import AsyncClient, Client, Context, DocumentError, Fail, WaitTimeout, task

GUIDE = SAMPLES / "guide.md"
ENCRYPTED = TEST_DATA / "encrypted.pdf"


@task("ing_then_fails", max_retries=0)
async def ing_then_fails(ctx: Context, payload: Any) -> None:
    raise Fail("the index is full")


@pytest.fixture
def fresh(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("TRUNCATE tasks, documents, batches, chunks, workers RESTART IDENTITY CASCADE")
    return conn


def test_the_api_is_public() -> None:
    assert {"enqueue_document", "enqueue_documents", "wait_document", "DocumentFailed"} <= set(jobq_workers.__all__)
    assert "enqueue_document" in (REPO / "README.md").read_text()


def test_bytes_with_a_name_and_a_path_are_the_same_document(fresh: psycopg.Connection[Any]) -> None:
    first = enqueue_document(GUIDE.read_bytes(), name="guide.md", owner="ada")
    assert first.doc_id is not None and first.tasks and first.path == "guide.md"
    row = fresh.execute("SELECT name, owner, format FROM documents WHERE id = %s", (first.doc_id,)).fetchone()
    assert row == ("guide.md", "ada", "md")
    # the same content again, while its tasks are live: refused with the CLI's reason
    with pytest.raises(DocumentError, match="still being processed") as info:
        enqueue_document(GUIDE, owner="ada")
    cli = jobq_cli("enqueue", str(GUIDE), "--owner", "ada")
    assert cli.returncode == 1 and str(info.value).split(": ", 1)[1] in cli.stderr.replace("\n", " ")


def test_a_refused_document_raises_and_writes_nothing(fresh: psycopg.Connection[Any]) -> None:
    with pytest.raises(DocumentError, match="encrypted"):
        enqueue_document(ENCRYPTED.read_bytes(), name="secret.pdf")
    with pytest.raises(DocumentError, match="needs a name"):
        enqueue_document(b"hello")
    with pytest.raises(DocumentError, match="unknown parser"):
        enqueue_document(GUIDE, parser="nonsense")
    with pytest.raises(DocumentError, match="needs a file path"):
        enqueue_document(b"# hi\n\nthere", name="a.md", by_reference=True)
    assert fresh.execute("SELECT count(*) FROM documents").fetchone() == (0,)


def test_the_batch_form_reports_each_document(fresh: psycopg.Connection[Any]) -> None:
    result = enqueue_documents([GUIDE, ("secret.pdf", ENCRYPTED.read_bytes()), ("notes.txt", b"some notes\n" * 50)],
                               priority=3)
    assert [f.ok for f in result.files] == [True, False, True] and result.batch_id is not None
    assert "encrypted" in (result.errors[0].error or "") and len(result.doc_ids) == 2
    assert fresh.execute("SELECT DISTINCT priority FROM tasks").fetchall() == [(3,)]


def test_wait_document(fresh: psycopg.Connection[Any], db_url: str) -> None:
    ok = enqueue_document(GUIDE)
    bad = enqueue_document(b"other notes\n" * 40, name="other.txt", then="ing_then_fails")
    assert ok.doc_id is not None and bad.doc_id is not None
    with pytest.raises(WaitTimeout):
        wait_document(ok.doc_id, timeout=0.2)  # no worker yet
    with BackgroundWorker(["dataflow", "ing_then_fails"], concurrency=4, poll_seconds=5):
        row = wait_document(ok.doc_id, timeout=60)
        assert row.status == "done" and row.chunks > 0
        with pytest.raises(DocumentFailed, match="index is full") as info:
            wait_document(bad.doc_id, timeout=60, client=Client(db_url))
    assert info.value.doc_id == bad.doc_id and info.value.status == "failed"
    with pytest.raises(DocumentError, match="no document 999999"):
        wait_document(999_999)


def test_the_async_twins(fresh: psycopg.Connection[Any], db_url: str) -> None:
    async def go() -> tuple[int, str]:
        one = await enqueue_document_async(b"async notes\n" * 30, name="a.txt")
        batch = await enqueue_documents_async([("b.txt", b"more async notes\n" * 30)])
        assert one.doc_id is not None and len(batch.doc_ids) == 1
        with BackgroundWorker(["dataflow"], concurrency=2, poll_seconds=5):
            async with AsyncClient(db_url) as c:
                row = await wait_document_async(one.doc_id, timeout=60, client=c)
        return row.chunks, row.status

    chunks, status = asyncio.run(go())
    assert status == "done" and chunks > 0
