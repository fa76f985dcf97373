"""Ingesting documents from Python: the public document API of jobq_workers (needs jobq[documents]).

``enqueue_document`` takes a path, or bytes with a name, and follows the rules of `jobq enqueue FILE`
(checks, reuse of unchanged ranges, refusals); ``enqueue_documents`` is the batch form, and
``wait_document`` waits for a document's tasks on the queue's shared listener.

Run: python examples/ingest.py  (uses JOBQ_DATABASE_URL, or the embedded PostgreSQL)
"""

from __future__ import annotations

import threading
from pathlib import Path

from jobq_workers import DocumentFailed, enqueue_document, enqueue_documents, wait_document
from jobqueue import DocumentError
from jobqueue.runtime.worker import run_worker

SAMPLES = Path(__file__).resolve().parent / "samples"


def main() -> tuple[str, int, list[bool], str]:
    notes = b"# Release notes\n\n" + b"Ingestion is now a Python call.\n\n" * 40
    doc = enqueue_document(notes, name="release-notes.md", owner="docs-team")
    batch = enqueue_documents([SAMPLES / "guide.md", ("broken.pdf", b"%PDF-1.7 not really")])
    worker = threading.Thread(target=run_worker, args=(["dataflow"],), kwargs={"burst": True})
    worker.start()  # in production: `jobq worker --types dataflow` on other machines
    try:
        assert doc.doc_id is not None
        row = wait_document(doc.doc_id, timeout=120)
    except DocumentFailed as exc:
        raise SystemExit(f"ingestion failed: {exc}") from None
    finally:
        worker.join()
    try:
        enqueue_document(b"", name="empty.txt")
        refused = "accepted"
    except DocumentError as exc:
        refused = str(exc)
    print(f"{row.name}: {row.status}, {row.chunks} chunk(s)", [f.ok for f in batch.files], refused, sep="\n")
    return row.status, row.chunks, [f.ok for f in batch.files], refused


if __name__ == "__main__":
    main()
