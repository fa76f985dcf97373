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

import psycopg

from jobq_workers.documents import enqueue_files
from jobqueue import get_settings
from jobqueue.admin.migrate import migrate
from jobqueue.db.connect import resolve_url
from jobqueue.runtime.worker import Worker

SAMPLES = Path(__file__).resolve().parent / "samples"


def main() -> int:
    url = resolve_url()
    migrate(url)
    files = sorted(str(p) for p in SAMPLES.iterdir() if p.suffix in {".pdf", ".csv", ".md"})
    batch = enqueue_files(files, then="raptor", owner="example")
    for f in batch.files:
        print(f"{Path(f.path).name}: document {f.doc_id}, {len(f.tasks)} dataflow task(s), "
              f"{f.reused} reused, raptor task {f.then_task}" if f.ok else f"{f.path}: {f.error}")

    schema = get_settings().schema_name
    done = failed = 0
    with psycopg.connect(url, autocommit=True) as conn:
        # A burst worker can stop just before a RAPTOR task released by the last chunking task becomes
        # claimable; another burst picks it up (it finds nothing else to do).
        for _ in range(5):
            worker = Worker(["dataflow", "raptor"], burst=True, concurrency=3)
            asyncio.run(worker.run())
            done, failed = done + worker.stats.done, failed + worker.stats.failed
            if not conn.execute(f"SELECT count(*) FROM {schema}.tasks WHERE batch_id = %s AND status = ANY(%s)",
                                (batch.batch_id, ["waiting", "queued", "running"])).fetchone()[0]:
                break
        print(f"worker: {done} task(s) done, {failed} failed")
        rows = conn.execute(
            f"SELECT doc_id, name, status, progress, tasks, chunks, tokens, summaries "
            f"FROM {schema}.document_progress WHERE batch_id = %s ORDER BY doc_id", (batch.batch_id,)).fetchall()
    print(f"{'id':>4}  {'name':<16} {'status':<9} {'progress':>8} {'tasks':>5} {'chunks':>6} {'tokens':>7} "
          f"{'summaries':>9}")
    for doc_id, name, status, progress, tasks, chunks, tokens, summaries in rows:
        print(f"{doc_id:>4}  {name:<16} {status:<9} {progress:>8.0%} {tasks:>5} {chunks:>6} {tokens:>7} "
              f"{summaries:>9}")
    return 0 if rows and all(r[2] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
