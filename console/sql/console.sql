-- What the web console (jobq_console, `jobq ui`) reads and writes beyond the clients' own statements
-- (Client.list/get/cancel/retry, jobq_workers' enqueue) and the observation views (observe/snapshot.py).
--
-- Conventions as in jobqueue/db/sql/client.sql: `{schema}` is filled in by the loader, parameters are
-- PostgreSQL's $1, $2 ..., a NULL filter is off, lists page by keyset (the last key seen), never OFFSET.

-- name: access
-- Whether this login may change anything (jobq_dashboard logs in read-only and holds no INSERT on tasks),
-- and whether it may pause or cap queues: that writes the queues table, which only the schema owner
-- may (docs/roles.md); the jobq_* roles see the state but not the controls. A producer reads neither
-- worker_health (the fleet's hosts and pids) nor chunks (only its own, through own_chunks): the workers
-- page then says so, and a document page reads own_chunks.
SELECT current_setting('transaction_read_only') = 'on'
       OR NOT has_any_column_privilege('{schema}.tasks', 'INSERT') AS read_only,
       current_setting('transaction_read_only') = 'off'
       AND has_table_privilege('{schema}.queues', 'INSERT, UPDATE') AS control,
       has_table_privilege('{schema}.worker_health', 'SELECT') AS workers,
       has_table_privilege('{schema}.chunks', 'SELECT') AS all_chunks;

-- name: parents
SELECT id, type, status, progress FROM {schema}.tasks WHERE id = ANY($1::bigint[]) ORDER BY id;

-- name: children
-- The tasks that depend on $1: a document's follow-up task through the document's index ($2), and any
-- other waiting child through the dependency index (finished children of a task without a document
-- are not looked for: that would scan the history).
SELECT id, type, status, progress FROM {schema}.tasks
WHERE ((doc_id = $2::bigint AND depends_on @> ARRAY[$1::bigint])
       OR (status = 'waiting' AND depends_on @> ARRAY[$1::bigint]))
ORDER BY id
LIMIT 200;

-- name: queue_position
SELECT {schema}.queue_position($1::bigint) AS ahead;

-- name: documents
-- Newest first. $3 is the last doc_id seen (keyset pagination).
SELECT doc_id, name, owner, format, pages, status, progress, tasks, waiting, queued, running, done, failed,
       cancelled, chunks, summaries, created_at, duration::float8 AS duration, last_message
FROM {schema}.document_progress
WHERE ($1::text IS NULL OR status = $1::text)
  AND ($2::text IS NULL OR owner = $2::text)
  AND ($3::bigint IS NULL OR doc_id < $3::bigint)
ORDER BY doc_id DESC
LIMIT $4::bigint;

-- name: document
SELECT doc_id, name, owner, batch_id, format, kind, parser, pages, size, by_reference, created_at, tasks,
       waiting, queued, running, done, failed, cancelled, progress, status, queue_position, last_message,
       error, chunks, tokens, summaries, started_at, finished_at, duration::float8 AS duration,
       process_duration::float8 AS process_duration
FROM {schema}.document_progress
WHERE doc_id = $1::bigint;

-- name: document_tasks
-- A document's ranges in page order, its follow-up task (raptor) last.
SELECT id, type, status, progress, priority, from_page, to_page, depends_on IS NOT NULL AS follow_up,
       last_error, started_at, finished_at
FROM {schema}.tasks
WHERE doc_id = $1::bigint
ORDER BY depends_on IS NOT NULL, from_page NULLS LAST, id
LIMIT 5000;

-- name: document_chunks
-- A page of a document's text chunks in reading order, after the key ($2 from_page, $3 position, $4 id).
SELECT id, task_id, position, from_page, to_page, token_count, left(text, $6::int) AS text,
       length(text) > $6::int AS cut
FROM {schema}.chunks
WHERE doc_id = $1::bigint AND level = 0
  AND ($2::int IS NULL OR (from_page, position, id) > ($2::int, $3::int, $4::bigint))
ORDER BY from_page, position, id
LIMIT $5::bigint;

-- name: document_summaries
-- The RAPTOR summaries (level > 0) with the parent each belongs to; the tree is built by the caller.
SELECT id, level, parent_id, position, from_page, to_page, token_count, left(text, $2::int) AS text
FROM {schema}.chunks
WHERE doc_id = $1::bigint AND level > 0
ORDER BY level DESC, position, id
LIMIT 1000;

-- name: own_document_chunks
-- document_chunks for a login that may read only its own documents' chunks (a producer: own_chunks).
SELECT id, task_id, position, from_page, to_page, token_count, left(text, $6::int) AS text,
       length(text) > $6::int AS cut
FROM {schema}.own_chunks
WHERE doc_id = $1::bigint AND level = 0
  AND ($2::int IS NULL OR (from_page, position, id) > ($2::int, $3::int, $4::bigint))
ORDER BY from_page, position, id
LIMIT $5::bigint;

-- name: own_document_summaries
SELECT id, level, parent_id, position, from_page, to_page, token_count, left(text, $2::int) AS text
FROM {schema}.own_chunks
WHERE doc_id = $1::bigint AND level > 0
ORDER BY level DESC, position, id
LIMIT 1000;

-- name: running_tasks
-- The running tasks by worker (the lease index holds exactly the running rows).
SELECT id, type, worker_id, progress, started_at, doc_id, lease_expires_at
FROM {schema}.tasks
WHERE status = 'running' AND lease_expires_at IS NOT NULL
ORDER BY worker_id, id
LIMIT 1000;

-- name: live_tasks
-- What a page shows live of each task; the newest progress line is the last line of progress_msg.
SELECT id, status, progress, regexp_replace(progress_msg, '^.*\n', '') AS message
FROM {schema}.tasks
WHERE id = ANY($1::bigint[])
ORDER BY id;

-- name: live_documents
SELECT doc_id AS id, status, progress, COALESCE(last_message, '') AS message, done, tasks, chunks, summaries
FROM {schema}.document_progress
WHERE doc_id = ANY($1::bigint[])
ORDER BY doc_id;

-- name: workers
-- The workers page reads only worker_health (the overview's snapshot reads every view); stopped
-- workers stay visible for $1 seconds, as in `jobq top`.
SELECT * FROM {schema}.worker_health
WHERE stopped_at IS NULL OR stopped_at > now() - make_interval(secs => $1)
ORDER BY state, worker_id;

-- name: failures
-- The failures page reads only the failures view: every (type, error) group of the last 24 hours.
SELECT type, error, failed, retried, tasks, first_seen, last_seen, latest_task_id, latest_message
FROM {schema}.failures ORDER BY last_seen DESC LIMIT $1;

-- name: overview
-- Per type, from the views `jobq top` reads: queue_depth summed over priorities, queue_state's pause, cap
-- and live workers serving the type (also for a type with no task yet), and the last hour's latency (the latency view's other windows are not computed: the
-- period filter removes their branches).
WITH depth AS (
    SELECT type, sum(queued) AS queued, sum(runnable) AS runnable, sum(scheduled) AS scheduled,
           sum(waiting) AS waiting, sum(running) AS running, sum(done_last_hour) AS done_last_hour,
           sum(failed_last_hour) AS failed_last_hour, sum(cancelled_last_hour) AS cancelled_last_hour,
           max(oldest_wait_seconds) AS oldest_wait_seconds, bool_or(paused) AS paused
    FROM {schema}.queue_depth
    GROUP BY type
), lat AS (
    SELECT type, wait_p50, run_p50, run_p95 FROM {schema}.latency WHERE period = '1h'
)
SELECT COALESCE(d.type, q.type) AS type,
       COALESCE(d.queued, 0) AS queued, COALESCE(d.runnable, 0) AS runnable,
       COALESCE(d.scheduled, 0) AS scheduled, COALESCE(d.waiting, 0) AS waiting,
       COALESCE(d.running, 0) AS running, COALESCE(d.done_last_hour, 0) AS done_last_hour,
       COALESCE(d.failed_last_hour, 0) AS failed_last_hour,
       COALESCE(d.cancelled_last_hour, 0) AS cancelled_last_hour,
       COALESCE(d.oldest_wait_seconds, 0) AS oldest_wait_seconds,
       COALESCE(d.paused, false) OR COALESCE(q.paused, false) AS paused, q.max_running,
       COALESCE(q.workers, 0) AS workers, l.wait_p50, l.run_p50, l.run_p95, now() AS at
FROM depth d
FULL JOIN {schema}.queue_state q ON q.type = d.type
LEFT JOIN lat l ON l.type = COALESCE(d.type, q.type)
ORDER BY 1;

-- name: flow_control
-- The overview's flow-control section (view of migration 0009): per (type, key) running, limit, rate and
-- what is held back, the held-back and the busiest first, at most $1 rows.
SELECT type, key, fair, queued, running, max_per_key, rate_n, rate_secs, rate_by_key, rate_used, held_by,
       held_back, wait_seconds
FROM {schema}.flow_control
ORDER BY held_back DESC, running DESC, queued DESC, type, key
LIMIT $1;
