-- What producers run: enqueue, cancel, retry, read (jobqueue/client/).
--
-- Conventions:
--   * `{schema}` is the schema, filled in by the loader (jobqueue/db/sqlfile.py).
--   * Parameters are PostgreSQL's own $1, $2 ... (asyncpg, and psycopg's RawCursor).
--   * Every write made on behalf of a claim is guarded by (id, attempt, status = 'running'): `attempt`
--     is the fencing token, so a worker whose lease was rescued can no longer touch the task.
--   * Whatever turns rows into `queued` notifies the type's channel `{schema}.<type>` with the earliest
--     run_at (epoch seconds) in the same transaction, so idle workers wake at once or set a timer.

-- name: enqueue
-- One task; a live task with the same dedupe_key wins and its id is returned with created = false.
-- $18: when it runs relative to its parents (run_on; NULL: success); $19: the enqueueing trace context.
WITH ins AS (
    INSERT INTO {schema}.tasks (type, priority, payload, run_at, max_retries, dedupe_key, doc_id, batch_id,
                            from_page, to_page, owner, labels, digest, status, depends_on, pending_deps,
                            progress_msg, finished_at, progress, run_on, trace_context)
    VALUES ($1, $2, $3::jsonb, COALESCE($4::timestamptz, now()), $5, $6, $7, $8, $9, $10, $11,
            COALESCE($12::text[], '{}'), $13, $14, $15, $16, COALESCE($17, ''),
            CASE WHEN $14 IN ('done', 'cancelled') THEN now() END,
            CASE WHEN $14 = 'done' THEN 1 ELSE 0 END, COALESCE($18::text, 'success'), $19::jsonb)
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('waiting', 'queued', 'running')
    DO NOTHING
    RETURNING id
)
SELECT id, true AS created FROM ins
UNION ALL
SELECT id, false FROM {schema}.tasks
WHERE $6::text IS NOT NULL AND dedupe_key = $6 AND status IN ('waiting', 'queued', 'running')
  AND NOT EXISTS (SELECT 1 FROM ins);

-- name: enqueue_many
-- Many tasks in one statement: enqueue_many's batches with dedupe keys (plain batches use COPY), and
-- concurrent enqueue() calls sharing one commit (jobqueue/client/group.py). $14 is each row's labels
-- as a JSON array (NULL: none). Returns one row per input, in input order: the new id, or the live
-- task's id on a dedupe conflict (including a duplicate key earlier in the same batch).
WITH input AS (
    SELECT i.*, nextval('{schema}.tasks_id_seq') AS new_id
    FROM unnest($1::text[], $2::int[], $3::text[], $4::timestamptz[], $5::int[], $6::text[],
                $7::bigint[], $8::bigint[], $9::int[], $10::int[], $11::text[], $12::text[], $13::text[],
                $14::text[])
        WITH ORDINALITY AS i(type, priority, payload, run_at, max_retries, dedupe_key, doc_id, batch_id,
                             from_page, to_page, owner, digest, trace_context, labels, ord)
), ins AS (
    INSERT INTO {schema}.tasks (id, type, priority, payload, run_at, max_retries, dedupe_key, doc_id, batch_id,
                            from_page, to_page, owner, digest, trace_context, labels)
    OVERRIDING SYSTEM VALUE
    SELECT new_id, type, priority, payload::jsonb, COALESCE(run_at, now()), max_retries, dedupe_key, doc_id,
           batch_id, from_page, to_page, owner, digest, trace_context::jsonb,
           ARRAY(SELECT jsonb_array_elements_text(labels::jsonb))
    FROM input ORDER BY ord
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('waiting', 'queued', 'running')
    DO NOTHING
    RETURNING id, dedupe_key
)
SELECT i.ord, COALESCE(mine.id, same.id, live.id) AS id, mine.id IS NOT NULL AS created
FROM input i
LEFT JOIN ins mine ON mine.id = i.new_id
LEFT JOIN ins same ON mine.id IS NULL AND same.dedupe_key = i.dedupe_key
LEFT JOIN {schema}.tasks live ON mine.id IS NULL AND same.id IS NULL AND live.dedupe_key = i.dedupe_key
     AND live.status IN ('waiting', 'queued', 'running')
ORDER BY i.ord;

-- name: reserve_ids
-- Ids for a COPY batch (COPY cannot return them), in order, as one array: one row to decode instead
-- of one per task (a thousand Records cost the client about a millisecond per batch).
SELECT array_agg(nextval('{schema}.tasks_id_seq')) AS ids FROM generate_series(1, $1::int);

-- name: copy_tasks
-- The COPY of a batch without dedupe keys; the columns are jobqueue.client.encode.COPY_COLUMNS.
COPY {schema}.tasks (id, type, priority, payload, run_at, max_retries, dedupe_key, doc_id, batch_id,
                     from_page, to_page, owner, digest, trace_context, labels) FROM STDIN;

-- name: copy_tasks_unlabelled
-- The same for a batch without labels: the column takes its default ('{}') instead of an empty array
-- encoded per row (jobqueue.client.encode.copy_columns).
COPY {schema}.tasks (id, type, priority, payload, run_at, max_retries, dedupe_key, doc_id, batch_id,
                     from_page, to_page, owner, digest, trace_context) FROM STDIN;

-- name: copy_tasks_bare
-- A batch of bare payloads (jobqueue.client.encode.BARE_COLUMNS): run_at and the rest take their defaults.
COPY {schema}.tasks (id, type, priority, payload, max_retries, trace_context) FROM STDIN;

-- name: lock_parents
-- Marks the parents of a new dependent task, locking them in id order (like every statement that
-- locks several task rows). The lock orders the insert that follows, in the same transaction,
-- against a parent's completion, so a child can never miss its parent's release.
WITH locked AS (
    SELECT id FROM {schema}.tasks WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
)
UPDATE {schema}.tasks t SET has_dependents = true
FROM locked
WHERE t.id = locked.id
RETURNING t.id, t.status;

-- name: cancel
-- Cancel tasks by id ($1) or by document ($2): queued and waiting ones at once, running ones get
-- cancel_requested_at and a NOTIFY that reaches the worker holding them; their waiting descendants
-- are cancelled too ($5 is their line). A producer cancels only the tasks its role enqueued: the
-- function (migration 0005) checks that and raises insufficient_privilege otherwise.
SELECT id, status, dependents_cancelled FROM {schema}.cancel_tasks($1::bigint[], $2, $3, $4, $5);

-- name: retry
-- Retry failed or cancelled tasks by id ($1) or by document ($2): a new life in the queue, waiting
-- for any parent that is not done (retried parents included). Raises unique_violation when a task's
-- dedupe key is held by a live task, insufficient_privilege for another role's task.
SELECT id, status FROM {schema}.retry_tasks($1::bigint[], $2, $3, $4);

-- name: cancel_where
-- Cancel the live tasks a selector matches: $1 type, $2 owner, $3 batch, $4 label, $5 document, $6
-- statuses (NULL: every live one); a NULL filter is off, and the function refuses a selector with none.
-- The matched tasks go through cancel_tasks (migration 0008): running ones hear it by NOTIFY. A
-- producer's selector matches only the tasks its role enqueued.
SELECT id, status, dependents_cancelled
FROM {schema}.cancel_where($1::text, $2::text, $3::bigint, $4::text, $5::bigint, $6::text[], $7, $8, $9);

-- name: retry_where
-- Retry the failed or cancelled tasks a selector matches (the filters of cancel_where) through retry_tasks.
SELECT id, status FROM {schema}.retry_where($1::text, $2::text, $3::bigint, $4::text, $5::bigint, $6::text[], $7, $8);

-- name: prioritize
-- Set priority $8 on the queued and waiting tasks named by ids ($1) or a selector ($2..$7, as
-- cancel_where); the next claim orders by it.
SELECT id, priority
FROM {schema}.prioritize_tasks($1::bigint[], $2::text, $3::text, $4::bigint, $5::text, $6::bigint, $7::text[],
                               $8::int);

-- name: set_queue
-- Pause, resume, cap or uncap type $1: $2 paused and $3 max_running (NULL: unchanged), $4 true clears
-- the cap. The claim reads the queues table in its own statement, so the change holds from the next
-- claim; running tasks are left alone. A queue that may run now wakes its type's workers (NOTIFY at
-- commit, as an enqueue does). Only roles that may write the queues table (the schema owner) can.
INSERT INTO {schema}.queues AS q (type, paused, max_running, updated_at)
VALUES ($1::text, COALESCE($2::boolean, false), CASE WHEN $4::boolean THEN NULL ELSE $3::int END, now())
ON CONFLICT (type) DO UPDATE
SET paused = COALESCE($2::boolean, q.paused),
    max_running = CASE WHEN $4::boolean THEN NULL ELSE COALESCE($3::int, q.max_running) END,
    updated_at = now()
RETURNING q.type, q.paused, q.max_running,
          CASE WHEN NOT q.paused THEN pg_notify('{schema}.' || q.type, extract(epoch FROM now())::text) END
              AS woken;

-- name: queues
-- Every type known anywhere (queues table, live tasks, live workers): the view queue_state (0008).
SELECT type, paused, max_running, queued, runnable, waiting, running, workers, updated_at
FROM {schema}.queue_state ORDER BY type;

-- name: get
SELECT * FROM {schema}.tasks WHERE id = $1::bigint;

-- name: list
-- Newest first; a NULL filter is off. Keyset pagination: pass the last id seen as $6 (before_id).
-- $8 finds text in last_error (case-insensitive; a plain substring, no pattern characters).
SELECT * FROM {schema}.tasks
WHERE ($1::text[] IS NULL OR status = ANY($1::text[]))
  AND ($2::text[] IS NULL OR type = ANY($2::text[]))
  AND ($3::text IS NULL OR owner = $3::text)
  AND ($4::bigint IS NULL OR doc_id = $4::bigint)
  AND ($5::text IS NULL OR labels @> ARRAY[$5::text])
  AND ($6::bigint IS NULL OR id < $6::bigint)
  AND ($8::text IS NULL OR strpos(lower(last_error), lower($8::text)) > 0)
ORDER BY id DESC
LIMIT $7::bigint;
