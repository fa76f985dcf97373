"""The document pipeline end to end, in one process.

Enqueues the sample documents (a 37-page PDF, a 7,000-row CSV, a Markdown guide) as one batch with a
RAPTOR task after each document's chunking, runs a burst worker until nothing is left to do, and
prints every document with its status and chunk counts, as `jobq docs` would.

    python examples/pipeline.py            # the embedded server, or JOBQ_DATABASE_URL

Run it twice: the second run reuses every chunk (the documents did not change) and runs nothing.
Exit status 0 when every document is done.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from jobq_workers.documents import enqueue_files, list_documents
from jobq_workers.watch import FINISHED
from jobqueue import Client
from jobqueue.admin.migrate import migrate
from jobqueue.runtime.worker import Worker

SAMPLES = Path(__file__).resolve().parent / "samples"


def main() -> int:
    url = Client().url
    migrate(url)
    files = sorted(str(p) for p in SAMPLES.iterdir() if p.suffix in {".pdf", ".csv", ".md"})
    batch = enqueue_files(files, then="raptor", owner="example")
    for f in batch.files:
        print(f"{Path(f.path).name}: document {f.doc_id}, {len(f.tasks)} dataflow task(s), "
              f"{f.reused} reused, raptor task {f.then_task}" if f.ok else f"{f.path}: {f.error}")

    done = failed = 0
    # A burst worker can stop just before a RAPTOR task released by the last chunking task becomes
    # claimable; another burst picks it up (it finds nothing else to do).
    for _ in range(5):
        worker = Worker(["dataflow", "raptor"], burst=True, concurrency=3)
        asyncio.run(worker.run())
        done, failed = done + worker.stats.done, failed + worker.stats.failed
        docs = list_documents(batch=batch.batch_id, url=url)
        if all(d.status in FINISHED for d in docs):
            break
    print(f"worker: {done} task(s) done, {failed} failed")
    docs = sorted(docs, key=lambda d: d.doc_id)
    print(f"{'id':>4}  {'name':<16} {'status':<9} {'progress':>8} {'tasks':>5} {'chunks':>6} {'tokens':>7} "
          f"{'summaries':>9}")
    for d in docs:
        print(f"{d.doc_id:>4}  {d.name:<16} {d.status:<9} {d.progress:>8.0%} {d.tasks:>5} {d.chunks:>6} "
              f"{d.tokens:>7} {d.summaries:>9}")
    return 0 if docs and all(d.status == "done" for d in docs) else 1


if __name__ == "__main__":
    sys.exit(main())
