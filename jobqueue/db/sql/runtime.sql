-- What a worker runs for the tasks it claims: claim, complete, fail, snooze, progress, heartbeat
-- (jobqueue/runtime/).
--
-- Conventions:
--   * `{schema}` is the schema, filled in by the loader (jobqueue/db/sqlfile.py).
--   * Parameters are PostgreSQL's own $1, $2 ... (asyncpg, and psycopg's RawCursor).
--   * Every write made on behalf of a claim is guarded by (id, attempt, status = 'running'): `attempt`
--     is the fencing token, so a worker whose lease was rescued can no longer touch the task.
--   * Whatever turns rows into `queued` notifies the type's channel `{schema}.<type>` with the earliest
--     run_at (epoch seconds) in the same transaction, so idle workers wake at once or set a timer.

-- name: claim
-- Claims up to $3 tasks for one worker: per type at most the type's free local slots ($2), in
-- priority order, skipping rows other workers hold, honouring paused queues. A type with a
-- max_running cap is claimed only if listed in $6, the capped types whose running count the caller
-- checked in this transaction (under cap_lock): a cap set a moment ago holds from this claim on.
-- The claim commits without waiting for the WAL flush (synchronous_commit off for this transaction
-- only): a claim lost in a server crash is the same as a worker that crashed right after claiming,
-- which leases, rescue and the fencing token already handle; the completion stays fully durable.
-- Rows are locked with SKIP LOCKED, never waited for, so the priority order in which they are taken
-- cannot be part of a deadlock with the id-ordered statements (heartbeat, progress, completion).
WITH wanted AS (
    SELECT w.type, w.n
    FROM unnest($1::text[], $2::int[]) AS w(type, n),
         (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
    WHERE w.n > 0
      AND NOT EXISTS (SELECT 1 FROM {schema}.queues q
                      WHERE q.type = w.type
                        AND (q.paused OR (q.max_running IS NOT NULL AND NOT q.type = ANY($6::text[]))))
), candidates AS (
    SELECT c.id, c.priority, c.run_at
    FROM wanted, LATERAL (
        SELECT t.id, t.priority, t.run_at
        FROM {schema}.tasks t
        WHERE t.status = 'queued' AND t.type = wanted.type AND t.run_at <= now()
        ORDER BY t.priority DESC, t.run_at, t.id
        LIMIT wanted.n
        FOR UPDATE SKIP LOCKED
    ) c
    ORDER BY c.priority DESC, c.run_at, c.id
    LIMIT $3
)
UPDATE {schema}.tasks t
SET status = 'running', worker_id = $4, attempt = t.attempt + 1, started_at = now(),
    lease_expires_at = now() + make_interval(secs => $5)
FROM candidates c
WHERE t.id = c.id
RETURNING t.id, t.type, t.priority, t.payload::text AS payload, t.attempt, t.retry_count, t.max_retries,
          t.created_at, t.run_at, t.doc_id, t.batch_id, t.from_page, t.to_page, t.owner, t.labels,
          t.digest, t.cancel_requested_at IS NOT NULL AS cancel_requested;

-- name: running_count
-- Cluster-wide running tasks of types that have a max_running cap (claims of capped types take a
-- per-type advisory lock first, then read this, so the cap holds across workers).
SELECT q.type, q.max_running, (SELECT count(*) FROM {schema}.tasks t
                               WHERE t.status = 'running' AND t.type = q.type) AS running
FROM {schema}.queues q
WHERE q.type = ANY($1::text[]) AND q.max_running IS NOT NULL;

-- name: cap_lock
-- Serialises the claims of capped types across workers (transaction-scoped advisory locks, taken in
-- name order so two workers claiming several capped types cannot deadlock on them).
SELECT pg_advisory_xact_lock(hashtext('{schema}.cap.' || s.type))
FROM (SELECT DISTINCT type FROM unnest($1::text[]) AS u(type) ORDER BY type) AS s;

-- name: capped_types
SELECT type FROM {schema}.queues WHERE type = ANY($1::text[]) AND max_running IS NOT NULL;

-- name: next_wake
-- After a claim that found nothing: which of the worker's types ($1) have a max_running cap now (a
-- cap set since the last heartbeat applies from the next claim on), and in how many seconds the
-- earliest task of the types that could be claimed ($2: those with free local slots) becomes
-- runnable, measured on the database's clock (a worker whose clock is ahead must not wake early and
-- spin). Paused types and types at their cluster-wide cap are left out: they wake the worker by
-- NOTIFY or the poll, never by a timer that fires at once (a tight re-claim loop). Also returns the
-- database's clock, so NOTIFY payloads (epoch seconds) can be read against it.
SELECT ARRAY(SELECT q.type FROM {schema}.queues q
             WHERE q.type = ANY($1::text[]) AND q.max_running IS NOT NULL) AS capped,
       (SELECT extract(epoch FROM min(n.run_at) - now())::float8
        FROM unnest($2::text[]) AS w(type),
             LATERAL (SELECT t.run_at FROM {schema}.tasks t
                      WHERE t.status = 'queued' AND t.type = w.type
                      ORDER BY t.run_at LIMIT 1) AS n
        WHERE NOT EXISTS (
            SELECT 1 FROM {schema}.queues q
            WHERE q.type = w.type
              AND (q.paused OR (q.max_running IS NOT NULL
                                AND q.max_running <= (SELECT count(*) FROM {schema}.tasks r
                                                      WHERE r.status = 'running' AND r.type = w.type))))
       ) AS delay,
       extract(epoch FROM now())::float8 AS db_now;

-- name: complete_many
-- Batched success: done, progress 1, result, duration and the worker's counter, in one statement.
WITH d AS (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[]) AS d(id, attempt, result, line)
), locked AS MATERIALIZED (
    -- Rows locked in id order, like every statement that locks several task rows (the heartbeat,
    -- progress_many): two of them can never wait for each other in a cycle (issue 11, item 1).
    SELECT t.id FROM {schema}.tasks t JOIN d ON d.id = t.id
    -- The worker id joins the fencing check: a claim lost in a server crash (claims commit
    -- asynchronously) could hand the same attempt number out twice, never to the same worker id.
    WHERE t.attempt = d.attempt AND t.status = 'running' AND t.worker_id = $6
    ORDER BY t.id
    FOR UPDATE OF t
), done AS (
    UPDATE {schema}.tasks t
    SET status = 'done', progress = 1, result = d.result::jsonb, finished_at = now(),
        process_duration = extract(epoch FROM now() - t.started_at), lease_expires_at = NULL,
        progress_msg = {schema}.append_log(t.progress_msg, d.line, $5)
    FROM d, locked
    WHERE t.id = d.id AND t.id = locked.id
      AND t.attempt = d.attempt AND t.status = 'running' AND t.worker_id = $6
    RETURNING t.id, t.has_dependents, t.doc_id
), counted AS (
    UPDATE {schema}.workers SET done = done + (SELECT count(*) FROM done), last_seen = now()
    WHERE id = $6
)
-- Document tasks also tell watchers (`jobq watch`) that they finished.
SELECT id, has_dependents,
       CASE WHEN doc_id IS NOT NULL THEN pg_notify('{schema}.progress', id || ',' || doc_id || ',1') END
FROM done;

-- name: release_dependents
-- Parents $1 finished as done: count them off their waiting children; a child whose last parent is
-- done becomes queued (and wakes its type) in the parent's transaction. Must run as its own
-- statement after the parents' update, so its snapshot sees children enqueued concurrently.
WITH parents AS (
    SELECT unnest($1::bigint[]) AS id
), child AS (
    SELECT c.id, (SELECT count(*) FROM parents p WHERE p.id = ANY (c.depends_on)) AS k
    FROM {schema}.tasks c
    WHERE c.depends_on && $1::bigint[] AND c.status = 'waiting'
), released AS (
    UPDATE {schema}.tasks t
    SET pending_deps = t.pending_deps - child.k,
        status = CASE WHEN t.pending_deps - child.k <= 0 THEN 'queued' ELSE 'waiting' END,
        run_at = CASE WHEN t.pending_deps - child.k <= 0 THEN greatest(t.run_at, now()) ELSE t.run_at END
    FROM child
    WHERE t.id = child.id AND t.status = 'waiting'
    RETURNING t.id, t.type, t.status, t.run_at
)
SELECT r.type, pg_notify('{schema}.' || r.type, extract(epoch FROM min(r.run_at))::text)
FROM released r WHERE r.status = 'queued' GROUP BY r.type;

-- name: cancel_dependents
-- Parents $1 failed or were cancelled: their waiting descendants are cancelled, with the reason.
WITH RECURSIVE doomed AS (
    SELECT c.id FROM {schema}.tasks c WHERE c.depends_on && $1::bigint[] AND c.status = 'waiting'
    UNION
    SELECT c.id FROM {schema}.tasks c JOIN doomed d ON c.depends_on @> ARRAY[d.id] WHERE c.status = 'waiting'
)
UPDATE {schema}.tasks t
SET status = 'cancelled', finished_at = now(), progress_msg = {schema}.append_log(t.progress_msg, $2, $3)
FROM doomed
WHERE t.id = doomed.id AND t.status = 'waiting'
RETURNING t.id, pg_notify('{schema}.progress', t.id || ',' || COALESCE(t.doc_id, 0) || ',' || t.progress);

-- name: fail
-- A failed attempt: back to queued after a backoff while retries remain ($3 = false), else failed.
-- $3 = true fails at once (non-retryable). The backoff is base * 2^retry_count capped at $5, with
-- jitter in [0.5, 1.0] so a burst of failures does not come back as a burst.
WITH f AS (
    UPDATE {schema}.tasks t
    SET retry_count = t.retry_count + 1,
        status = CASE WHEN NOT $3 AND t.retry_count < t.max_retries THEN 'queued' ELSE 'failed' END,
        run_at = CASE WHEN NOT $3 AND t.retry_count < t.max_retries
                      THEN now() + make_interval(secs => least($4 * power(2, t.retry_count), $5)
                                                        * (0.5 + random() * 0.5))
                      ELSE t.run_at END,
        progress = CASE WHEN NOT $3 AND t.retry_count < t.max_retries THEN t.progress ELSE -1 END,
        finished_at = CASE WHEN NOT $3 AND t.retry_count < t.max_retries THEN NULL ELSE now() END,
        process_duration = extract(epoch FROM now() - t.started_at),
        last_error = $6,
        requeue_reason = CASE WHEN NOT $3 AND t.retry_count < t.max_retries THEN 'error' ELSE t.requeue_reason END,
        worker_id = CASE WHEN NOT $3 AND t.retry_count < t.max_retries
                                          THEN NULL ELSE t.worker_id END,
        lease_expires_at = NULL,
        progress_msg = {schema}.append_log(t.progress_msg,
            $7 || CASE WHEN NOT $3 AND t.retry_count < t.max_retries
                       THEN ' (retry ' || (t.retry_count + 1) || ' of ' || t.max_retries || ')'
                       ELSE '' END, $8)
    WHERE t.id = $1 AND t.attempt = $2 AND t.status = 'running'
    RETURNING t.id, t.type, t.status, t.run_at, t.has_dependents, t.worker_id, t.doc_id, t.progress
), counted AS (
    UPDATE {schema}.workers SET failed = failed + 1 WHERE id = $9 AND EXISTS (SELECT 1 FROM f WHERE f.status = 'failed')
)
SELECT f.status, f.run_at, f.has_dependents,
       CASE WHEN f.status = 'queued' THEN pg_notify('{schema}.' || f.type, extract(epoch FROM f.run_at)::text)
            ELSE pg_notify('{schema}.progress', f.id || ',' || COALESCE(f.doc_id, 0) || ',' || f.progress) END
FROM f;

-- name: snooze
-- Run again after $3 seconds without counting a retry (the attempt still counts as a claim).
WITH s AS (
    UPDATE {schema}.tasks t
    SET status = 'queued', run_at = now() + make_interval(secs => $3), worker_id = NULL,
        lease_expires_at = NULL, progress_msg = {schema}.append_log(t.progress_msg, $4, $5)
    WHERE t.id = $1 AND t.attempt = $2 AND t.status = 'running'
    RETURNING t.type, t.run_at
)
SELECT pg_notify('{schema}.' || s.type, extract(epoch FROM s.run_at)::text) FROM s;

-- name: mark_cancelled
-- The worker stopped a running task because a cancel was requested.
WITH c AS (
    UPDATE {schema}.tasks t
    SET status = 'cancelled', finished_at = now(), process_duration = extract(epoch FROM now() - t.started_at),
        lease_expires_at = NULL, progress_msg = {schema}.append_log(t.progress_msg, $3, $4)
    WHERE t.id = $1 AND t.attempt = $2 AND t.status = 'running'
    RETURNING t.id, t.doc_id, t.progress, t.has_dependents
)
SELECT c.has_dependents, pg_notify('{schema}.progress', c.id || ',' || COALESCE(c.doc_id, 0) || ',' || c.progress)
FROM c;

-- name: progress_many
-- Coalesced progress for many tasks in one statement. Progress never goes backwards except to -1,
-- and -1 sticks unless a value >= 1 arrives. Returns, per task still ours, whether a cancel was
-- requested; a task missing from the result is no longer ours (lease lost). The same attempt may
-- still append its last lines once it finished (a flush racing the handler's own completion), but
-- no longer moves the progress.
WITH d AS (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::real[], $4::text[]) AS d(id, attempt, progress, lines)
), locked AS MATERIALIZED (
    -- in id order, like complete_many and the heartbeat (no lock cycles between them)
    SELECT t.id FROM {schema}.tasks t JOIN d ON d.id = t.id
    WHERE t.attempt = d.attempt AND t.status NOT IN ('queued', 'waiting')
    ORDER BY t.id
    FOR UPDATE OF t
), u AS (
    UPDATE {schema}.tasks t
    SET progress = CASE WHEN t.status <> 'running' OR d.progress IS NULL THEN t.progress
                        WHEN d.progress < 0 THEN -1
                        WHEN t.progress < 0 AND d.progress < 1 THEN t.progress
                        ELSE greatest(t.progress, least(d.progress, 1)) END,
        progress_msg = {schema}.append_log(t.progress_msg, d.lines, $5)
    FROM d, locked
    WHERE t.id = d.id AND t.id = locked.id AND t.attempt = d.attempt AND t.status NOT IN ('queued', 'waiting')
    RETURNING t.id, t.doc_id, t.progress, t.cancel_requested_at IS NOT NULL AS cancel_requested
)
SELECT u.id, u.cancel_requested,
       pg_notify('{schema}.progress', u.id || ',' || COALESCE(u.doc_id, 0) || ',' || u.progress)
FROM u;

-- name: heartbeat
-- Registers the worker and renews the leases of its running attempts, given as (id, attempt) pairs
-- ($8, $9): a task this worker re-claimed after losing it is renewed for the new attempt only.
-- The rows are locked in id order and locked rows are skipped, never waited for: a producer holding
-- a parent row in an open transaction (or an operator's BEGIN; UPDATE ...) must not stop the renewal
-- of every other lease; a skipped row is renewed by the next beat. Returns one row per pair: `ours`
-- (still running under this worker and attempt, as committed), `renewed`, and the cancel flag (the
-- fallback when a cancel NOTIFY was missed).
-- The worker's own row is not waited for either (the completer's transaction updates its counter):
-- it is registered once, then touched when its lock is free.
WITH registered AS (
    INSERT INTO {schema}.workers (id, host, pid, types, concurrency, version, lease_seconds)
    SELECT $1, $2, $3, $4, $5, $6, $7
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.workers WHERE id = $1)
    ON CONFLICT (id) DO NOTHING
), me AS (
    SELECT id FROM {schema}.workers WHERE id = $1 FOR UPDATE SKIP LOCKED
), touched AS (
    UPDATE {schema}.workers w SET last_seen = now(), stopped_at = NULL, lease_seconds = $7
    FROM me WHERE w.id = me.id
), mine AS (
    SELECT p.id, p.attempt FROM unnest($8::bigint[], $9::int[]) AS p(id, attempt)
), locked AS (
    SELECT t.id
    FROM {schema}.tasks t JOIN mine m ON m.id = t.id AND m.attempt = t.attempt
    WHERE t.worker_id = $1 AND t.status = 'running'
    ORDER BY t.id
    FOR UPDATE OF t SKIP LOCKED
), l AS (
    UPDATE {schema}.tasks t
    SET lease_expires_at = now() + make_interval(secs => $7)
    FROM locked
    WHERE t.id = locked.id
    RETURNING t.id
)
SELECT m.id, m.attempt, t.id IS NOT NULL AS ours, l.id IS NOT NULL AS renewed,
       COALESCE(t.cancel_requested_at IS NOT NULL, false) AS cancel_requested
FROM mine m
LEFT JOIN {schema}.tasks t ON t.id = m.id AND t.attempt = m.attempt AND t.worker_id = $1 AND t.status = 'running'
LEFT JOIN l ON l.id = m.id;

-- name: confirm_cancel
-- A cancel NOTIFY is only a hint (pg_notify needs no privilege): the attempts among ($2, $3) that
-- this worker ($1) still runs and whose cancel was really requested in the table.
SELECT t.id, t.attempt
FROM unnest($2::bigint[], $3::int[]) AS p(id, attempt)
JOIN {schema}.tasks t ON t.id = p.id AND t.attempt = p.attempt
WHERE t.worker_id = $1 AND t.status = 'running' AND t.cancel_requested_at IS NOT NULL;

-- name: worker_stopped
UPDATE {schema}.workers SET stopped_at = now(), last_seen = now() WHERE id = $1;

-- name: release
-- Graceful shutdown: give running tasks back without spending a retry.
WITH r AS (
    UPDATE {schema}.tasks t
    SET status = 'queued', run_at = now(), worker_id = NULL, lease_expires_at = NULL,
        progress_msg = {schema}.append_log(t.progress_msg, $3, $4)
    WHERE t.id = ANY($1::bigint[]) AND t.worker_id = $2 AND t.status = 'running'
    RETURNING t.id, t.type
)
SELECT r.id, pg_notify('{schema}.' || r.type, extract(epoch FROM now())::text) FROM r;
