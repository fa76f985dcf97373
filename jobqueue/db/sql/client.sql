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
WITH ins AS (
    INSERT INTO {schema}.tasks (type, priority, payload, run_at, max_retries, dedupe_key, doc_id, batch_id,
                            from_page, to_page, owner, labels, digest, status, depends_on, pending_deps,
                            progress_msg, finished_at, progress)
    VALUES ($1, $2, $3::jsonb, COALESCE($4::timestamptz, now()), $5, $6, $7, $8, $9, $10, $11,
            COALESCE($12::text[], '{}'), $13, $14, $15, $16, COALESCE($17, ''),
            CASE WHEN $14 IN ('done', 'cancelled') THEN now() END,
            CASE WHEN $14 = 'done' THEN 1 ELSE 0 END)
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
-- Many tasks in one statement (used when the batch has dedupe keys; plain batches use COPY).
-- Returns one row per input, in input order: the new id, or the live task's id on a dedupe conflict
-- (including a duplicate key earlier in the same batch).
WITH input AS (
    SELECT i.*, nextval('{schema}.tasks_id_seq') AS new_id
    FROM unnest($1::text[], $2::int[], $3::text[], $4::timestamptz[], $5::int[], $6::text[],
                $7::bigint[], $8::bigint[], $9::int[], $10::int[], $11::text[], $12::text[])
        WITH ORDINALITY AS i(type, priority, payload, run_at, max_retries, dedupe_key, doc_id, batch_id,
                             from_page, to_page, owner, digest, ord)
), ins AS (
    INSERT INTO {schema}.tasks (id, type, priority, payload, run_at, max_retries, dedupe_key, doc_id, batch_id,
                            from_page, to_page, owner, digest, labels)
    OVERRIDING SYSTEM VALUE
    SELECT new_id, type, priority, payload::jsonb, COALESCE(run_at, now()), max_retries, dedupe_key, doc_id,
           batch_id, from_page, to_page, owner, digest, COALESCE($13::text[], '{}')
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

-- name: lock_parents
-- Marks the parents of a new dependent task. The row lock this takes orders the insert against a
-- parent's completion, so a child can never miss its parent's release.
UPDATE {schema}.tasks SET has_dependents = true
WHERE id = ANY($1::bigint[])
RETURNING id, status;

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

-- name: task_status
SELECT status FROM {schema}.tasks WHERE id = $1;

-- name: get
SELECT * FROM {schema}.tasks WHERE id = $1;
