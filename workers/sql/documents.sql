-- What the document pipeline runs (jobq_workers): storing documents at enqueue, reading them and
-- writing chunks in the dataflow and raptor handlers, and the watcher's reads.
--
-- Same conventions as jobqueue/db/sql/*.sql: `{schema}` is the one placeholder, parameters are
-- PostgreSQL's own $1, $2 ... so one text serves psycopg (RawCursor) and asyncpg alike.

-- ---------------------------------------------------------------- enqueue (documents.py)

-- name: new_batch
INSERT INTO {schema}.batches (owner, requested) VALUES ($1, $2) RETURNING id;

-- name: batch_rejected
UPDATE {schema}.batches SET rejected = $2 WHERE id = $1;

-- name: find_document
-- The document with this content for this owner, locked so two enqueues of it take turns.
SELECT id, content IS NOT NULL AS stored
FROM {schema}.documents
WHERE COALESCE(owner, '') = COALESCE($1::text, '') AND content_digest = $2
FOR UPDATE;

-- name: insert_document
-- No row when a concurrent call inserted the same content first (find_document then finds it).
INSERT INTO {schema}.documents (batch_id, name, size, format, kind, parser, pages, content_digest, content, uri,
                                owner)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT ((COALESCE(owner, '')), content_digest) DO NOTHING
RETURNING id;

-- name: update_document
-- Re-enqueue of known content. The bytes travel again only when the storage mode changes:
-- $9 is the new uri (by reference: the content goes), else $10 is the content to store, or NULL
-- to keep the stored bytes as they are.
UPDATE {schema}.documents
SET batch_id = $2, name = $3, size = $4, format = $5, kind = $6, parser = $7, pages = $8,
    content = CASE WHEN $9::text IS NOT NULL THEN NULL ELSE COALESCE($10::bytea, content) END,
    uri = CASE WHEN $9::text IS NOT NULL THEN $9::text WHEN $10::bytea IS NOT NULL THEN NULL ELSE uri END,
    updated_at = now()
WHERE id = $1;

-- name: live_task_count
SELECT count(*) FROM {schema}.tasks WHERE doc_id = $1 AND status IN ('waiting', 'queued', 'running');

-- name: reusable_tasks
-- Finished tasks of the document's current run (earlier runs are history: their chunks are gone), by
-- (type, digest); the oldest wins a tie.
SELECT id, type, digest
FROM {schema}.tasks
WHERE doc_id = $1 AND status = 'done' AND digest IS NOT NULL AND superseded_at IS NULL
ORDER BY id;

-- name: summary_count
-- The document's RAPTOR summaries (through the view: a producer has no grant on chunks).
SELECT summaries FROM {schema}.document_progress WHERE doc_id = $1;

-- name: reuse_task
-- A new task recorded done at once with the chunks of finished task $1 (a SECURITY DEFINER function of
-- migration 0005, so a producer needs no grant on chunks); "{moved}" in the line $5 becomes the count.
SELECT id, moved FROM {schema}.reuse_task($1, $2, $3, $4, $5);

-- name: replace_document_run
-- The previous run's other tasks are marked superseded (kept as history until the pruner removes
-- them), and whatever chunks no reused task took over go.
SELECT {schema}.replace_document_run($1, $2::bigint[]);

-- name: list_documents
-- `jobq docs`: most recently enqueued first (re-enqueueing moves a document to the new batch), each
-- filter optional.
SELECT doc_id, name, pages, status, progress, tasks, done, chunks, tokens, summaries, batch_id,
       duration::float8
FROM {schema}.document_progress
WHERE ($1::bigint IS NULL OR batch_id = $1) AND ($2::text IS NULL OR owner = $2)
  AND ($3::text IS NULL OR status = $3)
ORDER BY batch_id DESC NULLS LAST, doc_id DESC
LIMIT $4;

-- ---------------------------------------------------------------- watching (watch.py)

-- name: batch_documents
SELECT id FROM {schema}.documents WHERE batch_id = $1 ORDER BY id;

-- name: batch_exists
SELECT EXISTS (SELECT 1 FROM {schema}.batches WHERE id = $1);

-- name: document_exists
SELECT EXISTS (SELECT 1 FROM {schema}.documents WHERE id = $1);

-- name: task_exists
SELECT EXISTS (SELECT 1 FROM {schema}.tasks WHERE id = $1);

-- name: listen_progress
-- Workers' progress flushes notify `task_id,doc_id,progress` here.
LISTEN "{schema}.progress";

-- name: document_rows
SELECT doc_id, name, status, progress, queue_position, chunks, summaries, last_message, error
FROM {schema}.document_progress
WHERE doc_id = ANY($1::bigint[])
ORDER BY doc_id;

-- name: task_rows
-- A single task as a watcher line; its newest progress message is the last line of progress_msg.
SELECT t.id, t.type, t.status, t.progress, {schema}.queue_position(t.id) AS ahead, t.last_error,
       (SELECT count(*) FROM {schema}.chunks k WHERE k.task_id = t.id) AS chunks,
       regexp_replace(t.progress_msg, '^.*\n', '') AS last_message
FROM {schema}.tasks t
WHERE t.id = ANY($1::bigint[])
ORDER BY t.id;

-- ---------------------------------------------------------------- handlers (dataflow.py, raptor.py)

-- name: load_document
-- $2 = false leaves the bytes behind (raptor reads only chunks).
SELECT id, name, format, kind, pages, size, content_digest, CASE WHEN $2::boolean THEN content END AS content, uri
FROM {schema}.documents
WHERE id = $1;

-- name: insert_chunks
INSERT INTO {schema}.chunks (doc_id, task_id, level, position, from_page, to_page, text, token_count, digest)
SELECT $1, $2, $3, u.*
FROM unnest($4::int[], $5::int[], $6::int[], $7::text[], $8::int[], $9::text[]) AS u
RETURNING position, id;

-- name: document_chunks
-- The leaves raptor summarises, in reading order.
SELECT id, text, from_page, to_page
FROM {schema}.chunks
WHERE doc_id = $1 AND level = 0
ORDER BY from_page, position, id;

-- name: delete_summaries
DELETE FROM {schema}.chunks WHERE doc_id = $1 AND level > 0;

-- name: link_parents
UPDATE {schema}.chunks k
SET parent_id = u.parent
FROM unnest($1::bigint[], $2::bigint[]) AS u(child, parent)
WHERE k.id = u.child;
