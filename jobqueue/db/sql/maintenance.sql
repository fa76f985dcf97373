-- The maintenance services a worker runs when it wins their advisory lock (jobqueue/runtime/maintenance/),
-- and the pruner's statements, which `jobq prune` runs too.
--
-- Conventions:
--   * `{schema}` is the schema, filled in by the loader (jobqueue/db/sqlfile.py).
--   * Parameters are PostgreSQL's own $1, $2 ... (asyncpg, and psycopg's RawCursor).
--   * Every write made on behalf of a claim is guarded by (id, attempt, status = 'running'): `attempt`
--     is the fencing token, so a worker whose lease was rescued can no longer touch the task.
--   * Whatever turns rows into `queued` notifies the type's channel `{schema}.<type>` with the earliest
--     run_at (epoch seconds) in the same transaction, so idle workers wake at once or set a timer.

-- name: rescue
-- Expired leases (their worker died or hung): back to queued with a retry counted, failed when
-- retries are exhausted, cancelled when a cancel had been requested. One rescuer at a time.
WITH gate AS (
    SELECT pg_try_advisory_xact_lock($1) AS ok
), expired AS (
    SELECT t.id FROM {schema}.tasks t, gate
    WHERE gate.ok AND t.status = 'running' AND t.lease_expires_at < now()
    ORDER BY t.lease_expires_at
    LIMIT 1000
    FOR UPDATE OF t SKIP LOCKED
), r AS (
    UPDATE {schema}.tasks t
    SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN t.retry_count < t.max_retries THEN 'queued' ELSE 'failed' END,
        retry_count = t.retry_count + CASE WHEN t.cancel_requested_at IS NULL THEN 1 ELSE 0 END,
        progress = CASE WHEN t.cancel_requested_at IS NULL AND t.retry_count >= t.max_retries
                        THEN -1 ELSE t.progress END,
        run_at = now(),
        finished_at = CASE WHEN t.cancel_requested_at IS NOT NULL OR t.retry_count >= t.max_retries
                           THEN now() END,
        last_error = CASE WHEN t.cancel_requested_at IS NULL
                          THEN 'worker ' || COALESCE(t.worker_id, '?') || ' lost (lease expired)'
                          ELSE t.last_error END,
        progress_msg = {schema}.append_log(t.progress_msg, to_char(now(), 'HH24:MI:SS') || ' [WARN] worker '
                       || COALESCE(t.worker_id, '?') || ' lost; task rescued', $2),
        requeue_reason = CASE WHEN t.cancel_requested_at IS NULL AND t.retry_count < t.max_retries
                              THEN 'lost' ELSE t.requeue_reason END,
        worker_id = NULL, lease_expires_at = NULL
    FROM expired
    WHERE t.id = expired.id
    RETURNING t.id, t.type, t.status, t.has_dependents
)
SELECT r.id, r.type, r.status, r.has_dependents,
       CASE WHEN r.status = 'queued' THEN pg_notify('{schema}.' || r.type, extract(epoch FROM now())::text)
            -- failed or cancelled: waiters (Client.wait) hear it at once
            ELSE pg_notify('{schema}.finished', r.id::text) END
FROM r;

-- name: prune_lock
-- One pruner per cluster: a transaction-scoped lock per batch (a session lock would leak behind
-- PgBouncer in transaction mode, where its unlock may land on another connection).
SELECT pg_try_advisory_xact_lock($1);

-- name: prune_lock_timeout
-- A batch that cannot get its row locks within $1 gives up; the next pass tries again.
SELECT set_config('lock_timeout', $1, true);

-- name: prune_delete
-- Up to $3 finished tasks of statuses $1 older than $2 seconds, oldest first, through
-- tasks_finished_idx; rows someone holds are skipped.
WITH doomed AS (
    SELECT id FROM {schema}.tasks
    WHERE finished_at < now() - make_interval(secs => $2) AND status = ANY($1::text[])
    ORDER BY finished_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.tasks t USING doomed WHERE t.id = doomed.id;

-- name: prune_count
SELECT count(*) FROM {schema}.tasks
WHERE finished_at < now() - make_interval(secs => $2) AND status = ANY($1::text[]);

-- name: prune_workers
-- Worker rows not seen for $1 seconds (a crashed worker never marks itself stopped).
DELETE FROM {schema}.workers WHERE last_seen < now() - make_interval(secs => $1);
