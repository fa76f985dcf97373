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
-- created_at and run_at come back as microseconds since the epoch (int8): the worker makes a datetime
-- of one only when a handler reads it (ClaimedTask), since asyncpg's decoding of the two timestamps
-- was a quarter of the worker's CPU per no-op task (issue 12).
-- The time is the statement's, not the transaction's (now()): a capped type's claim runs after it
-- waited for cap_lock in the same transaction, and with now() it missed the tasks committed meanwhile
-- and started its leases short by the wait. Alone in its transaction, the two are the same.
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
        WHERE t.status = 'queued' AND t.type = wanted.type AND t.run_at <= statement_timestamp()
        ORDER BY t.priority DESC, t.run_at, t.id
        LIMIT wanted.n
        FOR UPDATE SKIP LOCKED
    ) c
    ORDER BY c.priority DESC, c.run_at, c.id
    LIMIT $3
)
UPDATE {schema}.tasks t
SET status = 'running', worker_id = $4, attempt = t.attempt + 1, started_at = statement_timestamp(),
    lease_expires_at = statement_timestamp() + make_interval(secs => $5)
FROM candidates c
WHERE t.id = c.id
RETURNING t.id, t.type, t.priority, t.payload::text AS payload, t.attempt, t.retry_count, t.max_retries,
          (extract(epoch FROM t.created_at) * 1000000)::int8 AS created_at,
          (extract(epoch FROM t.run_at) * 1000000)::int8 AS run_at, t.doc_id, t.batch_id, t.from_page, t.to_page, t.owner, t.labels,
          t.digest, t.cancel_requested_at IS NOT NULL AS cancel_requested, t.trace_context::text AS trace_context;

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

-- name: claim_flow
-- A flow-controlled type's claim (runtime/flow.py): fair claims, per-key limits, rate limits. The
-- statement is the function claim_flow of migration 0012 (one round trip: the type's lock, then the
-- claim with a snapshot taken after it); its comment says how it works.
SELECT * FROM {schema}.claim_flow($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);

-- name: flow_wait
-- After a rate-limited claim that got fewer tasks than asked: seconds until the earliest grant of
-- type $1 leaves its window of $2 seconds (the fetcher sets a timer for it, instead of backing off).
SELECT extract(epoch FROM min(g.at) + make_interval(secs => $2::float8) - clock_timestamp())::float8 AS wait
FROM {schema}.flow_grants g
WHERE g.type = $1 AND g.at > clock_timestamp() - make_interval(secs => $2::float8);

-- name: flow_declared
-- Which of the worker's types ($1) have a flow declaration stored (one a worker without it forgets).
SELECT type FROM {schema}.flow_rules WHERE type = ANY($1::text[]);

-- name: declare_flow
-- A type's flow declaration (the views read it) and its key index; SECURITY DEFINER (migration 0009).
SELECT {schema}.declare_flow($1, $2, $3, $4, $5, $6, $7, $8) AS index_name;

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

-- name: release_dependents
-- Parents $1 finished as done: count them off their waiting children; a child whose last parent is
-- done becomes queued (and wakes its type) in the parent's transaction. Must run as its own
-- statement after the parents' update, so its snapshot sees children enqueued concurrently. A child
-- that runs only on a parent's failure (run_on = 'failure') whose parents all succeeded is cancelled
-- instead; those of them that have dependents are returned, for cancel_dependents.
WITH parents AS (
    SELECT unnest($1::bigint[]) AS id
), child AS MATERIALIZED (
    -- Children locked in id order: two workers releasing overlapping children cannot deadlock.
    SELECT c.id, (SELECT count(*) FROM parents p WHERE p.id = ANY (c.depends_on)) AS k,
           c.run_on = 'failure' AND NOT EXISTS (
               SELECT 1 FROM {schema}.tasks p
               WHERE p.id = ANY (c.depends_on) AND p.status IN ('failed', 'cancelled')) AS skip
    FROM {schema}.tasks c
    WHERE c.depends_on && $1::bigint[] AND c.status = 'waiting'
    ORDER BY c.id
    FOR NO KEY UPDATE OF c
), released AS (
    UPDATE {schema}.tasks t
    SET pending_deps = t.pending_deps - child.k,
        status = CASE WHEN t.pending_deps - child.k > 0 THEN 'waiting'
                      WHEN child.skip THEN 'cancelled' ELSE 'queued' END,
        run_at = CASE WHEN t.pending_deps - child.k <= 0 THEN greatest(t.run_at, now()) ELSE t.run_at END,
        finished_at = CASE WHEN t.pending_deps - child.k <= 0 AND child.skip THEN now() ELSE t.finished_at END,
        progress_msg = CASE WHEN t.pending_deps - child.k <= 0 AND child.skip
                            THEN {schema}.append_log(t.progress_msg, $2, $3) ELSE t.progress_msg END
    FROM child
    WHERE t.id = child.id AND t.status = 'waiting'
    RETURNING t.id, t.type, t.status, t.run_at, t.has_dependents
), woken AS (
    SELECT r.type, pg_notify('{schema}.' || r.type, extract(epoch FROM min(r.run_at))::text)
    FROM released r WHERE r.status = 'queued' GROUP BY r.type
)
-- One row even when nothing was cancelled (id NULL), so `woken` is always evaluated.
SELECT c.id, c.has_dependents, w.n AS woken
FROM (SELECT count(*) AS n FROM woken) w
LEFT JOIN LATERAL (SELECT r.id, r.has_dependents FROM released r WHERE r.status = 'cancelled') c ON true;

-- name: cancel_dependents
-- Parents $1 failed or were cancelled: their waiting descendants are cancelled, with the reason. The
-- recursive walk is written once, as the function cancel_dependents (migration 0005), which the
-- producers' cancel_tasks uses too; it locks the descendants in id order.
SELECT d.id, pg_notify('{schema}.progress', d.id || ',' || COALESCE(d.doc_id, 0) || ',' || d.progress)
FROM {schema}.cancel_dependents($1::bigint[], $2, $3) AS d;

-- name: finish_many
-- Every outcome of a batch of attempts in one statement (River's JobSetStateIfRunningMany): done,
-- retry, failed, snoozed, cancelled, released. Inputs, one element per attempt: $1 id, $2 attempt,
-- $3 outcome, $4 result (JSON text, done only), $5 error (last_error, retry/failed only), $6 log line,
-- $7 seconds (the snooze, or the backoff base of a retry), $8 the backoff cap (negative: $7 is the
-- exact delay of the retry); $9 log size, $10 worker.
-- Guarded by (id, attempt, worker_id, status = 'running'): a claim lost in a server crash (claims
-- commit asynchronously) could hand the same attempt number out twice, never to the same worker id.
-- A cancel requested while the attempt ran wins over a retry, a failure or a snooze. The rows are
-- locked in id order first (the heartbeat and the progress flush lock in the same order), so two of
-- the worker's own statements can never deadlock on a large table. Returns one row per row written.
-- The cost is one primary-key lookup per ack whatever the table's statistics: the acks are sorted
-- by id and each row is looked up and locked in a LATERAL subquery the planner cannot flatten
-- into a join. (As a join, with statistics taken when no task was running, PostgreSQL 15 planned
-- a scan of every running row against the whole batch: 9,000 acks among 20,000 running rows took
-- 57 s instead of about 0.2 s, the "collapse" of issue 12.)
WITH d AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::float8[], $8::float8[])
        AS d(id, attempt, outcome, result, error, line, secs, cap)
    ORDER BY d.id
), n AS MATERIALIZED (
    SELECT d.*,
           CASE WHEN d.outcome = 'done' THEN 'done'
                WHEN d.outcome = 'released' THEN 'queued'
                WHEN d.outcome = 'cancelled' OR t.cancel_requested THEN 'cancelled'
                WHEN d.outcome = 'snoozed' THEN 'queued'
                WHEN d.outcome = 'retry' AND t.retry_count < t.max_retries THEN 'queued'
                ELSE 'failed' END AS status,
           d.outcome IN ('retry', 'failed') AS errored
    FROM d CROSS JOIN LATERAL (
        SELECT t.cancel_requested_at IS NOT NULL AS cancel_requested, t.retry_count, t.max_retries
        FROM {schema}.tasks t
        WHERE t.id = d.id AND t.attempt = d.attempt AND t.status = 'running' AND t.worker_id = $10
        FOR NO KEY UPDATE OF t
    ) AS t
), u AS (
    UPDATE {schema}.tasks t
    SET status = n.status,
        result = CASE WHEN n.status = 'done' THEN n.result::jsonb ELSE t.result END,
        progress = CASE n.status WHEN 'done' THEN 1 WHEN 'failed' THEN -1 ELSE t.progress END,
        retry_count = t.retry_count + CASE WHEN n.errored THEN 1 ELSE 0 END,
        -- The backoff is base * 2^retry_count capped, with jitter in [0.5, 1.0] so a burst of failures
        -- does not come back as a burst; the exponent is capped so 2^n cannot overflow a float8.
        run_at = CASE WHEN n.status <> 'queued' THEN t.run_at
                      WHEN n.outcome = 'released' THEN now()
                      WHEN n.outcome = 'snoozed' THEN now() + make_interval(secs => n.secs)
                      -- A negative cap: the type's own backoff function chose the delay (@task(backoff=)).
                      WHEN n.cap < 0 THEN now() + make_interval(secs => n.secs)
                      ELSE now() + make_interval(secs => least(n.secs * power(2::float8, least(t.retry_count, 60)),
                                                               n.cap) * (0.5 + random() * 0.5)) END,
        finished_at = CASE WHEN n.status = 'queued' THEN NULL ELSE now() END,
        process_duration = CASE WHEN n.outcome IN ('released', 'snoozed') THEN t.process_duration
                                ELSE extract(epoch FROM now() - t.started_at) END,
        last_error = CASE WHEN n.errored THEN n.error ELSE t.last_error END,
        -- Why it went back to the queue, for the views (the rescuer sets 'lost').
        requeue_reason = CASE WHEN n.errored AND n.status = 'queued' THEN 'error' ELSE t.requeue_reason END,
        worker_id = CASE WHEN n.status = 'queued' THEN NULL ELSE t.worker_id END,
        lease_expires_at = NULL,
        progress_msg = {schema}.append_log(t.progress_msg,
            n.line || CASE WHEN n.errored AND n.status = 'queued'
                           THEN ' (retry ' || (t.retry_count + 1) || ' of ' || t.max_retries || ')'
                           WHEN n.status = 'cancelled' AND n.outcome <> 'cancelled'
                           THEN ' [Canceled] cancel requested while it ran'
                           ELSE '' END, $9)
    FROM n
    -- n's rows are locked by this statement and were checked there; = ANY keeps the update on the
    -- primary key whatever the statistics say about 'running' rows.
    WHERE t.id = ANY($1::bigint[]) AND t.id = n.id
    RETURNING t.id, t.type, t.status, t.run_at, t.has_dependents, t.doc_id, t.progress, n.outcome
), counted AS (
    UPDATE {schema}.workers
    SET done = done + (SELECT count(*) FROM u WHERE u.status = 'done'),
        failed = failed + (SELECT count(*) FROM u WHERE u.status = 'failed'), last_seen = now()
    WHERE id = $10
), woken AS (
    -- Whatever went back to queued wakes its type's workers with the earliest run_at.
    SELECT pg_notify('{schema}.' || u.type, extract(epoch FROM min(u.run_at))::text)
    FROM u WHERE u.status = 'queued' GROUP BY u.type
), finished AS (
    -- Waiters (Client.wait): the ids that reached a final state, as complete_many sends them.
    SELECT pg_notify('{schema}.finished', string_agg(f.id::text, ','))
    FROM (SELECT u.id, (row_number() OVER () - 1) / 300 AS part FROM u WHERE u.status <> 'queued') f
    GROUP BY f.part
)
SELECT u.id, u.status, u.outcome, u.run_at, u.has_dependents,
       -- Finished document tasks tell watchers (`jobq watch`); failures and cancels tell everyone.
       CASE WHEN u.status IN ('failed', 'cancelled') OR (u.status = 'done' AND u.doc_id IS NOT NULL)
            THEN pg_notify('{schema}.progress', u.id || ',' || COALESCE(u.doc_id, 0) || ',' || u.progress) END,
       (SELECT count(*) FROM woken) AS woken, (SELECT count(*) FROM finished) AS notified
FROM u;

-- name: complete_many
-- finish_many for a batch of successes only (the common case): the same fence (id, attempt, worker_id,
-- status = 'running') and the same lock order, without the expressions of the other outcomes. Inputs:
-- $1 id, $2 attempt, $3 result (JSON text; NULL: none has one), $4 log line, one element per attempt; $5 log size,
-- $6 worker; $7 true: leave out the tasks that have dependents (see below).
-- Returns one row for the whole batch: `written`, the rows written (fewer than the acks when a lease
-- was lost); `parents`, those of them that have dependents to release; `held`, the tasks left out.
-- (A row per task cost the worker a record decoded and read back per task for nothing, issue 12.)
-- With $7 the worker runs this statement alone, outside a transaction block: BEGIN and COMMIT were two
-- of its three round trips per batch. A task with dependents needs its release in the same transaction,
-- so it is left out and written again in one ($7 false). has_dependents is read under this
-- statement's row lock, which an enqueue's lock_parents (FOR UPDATE) conflicts with: a child either
-- committed before (the parent is held back) or sees its parent done.
-- Rows looked up by primary key one by one, in id order (see finish_many).
WITH d AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[]) AS d(id, attempt, result, line)
    ORDER BY d.id
), n AS MATERIALIZED (
    SELECT d.*, mine.has_dependents AND $7::bool AS held FROM d CROSS JOIN LATERAL (
        SELECT t.has_dependents FROM {schema}.tasks t
        WHERE t.id = d.id AND t.attempt = d.attempt AND t.status = 'running' AND t.worker_id = $6
        FOR NO KEY UPDATE OF t
    ) AS mine
), u AS (
    UPDATE {schema}.tasks t
    SET status = 'done', progress = 1, result = n.result::jsonb, finished_at = now(),
        process_duration = extract(epoch FROM now() - t.started_at), lease_expires_at = NULL,
        progress_msg = {schema}.append_log(t.progress_msg, n.line, $5)
    FROM n
    -- n's rows are locked by this statement and were checked there; = ANY keeps the update on the
    -- primary key whatever the statistics say about 'running' rows.
    WHERE t.id = ANY($1::bigint[]) AND t.id = n.id AND NOT n.held
    RETURNING t.id, t.status, t.run_at, t.has_dependents, t.doc_id
), counted AS (
    UPDATE {schema}.workers SET done = done + (SELECT count(*) FROM u), last_seen = now() WHERE id = $6
), finished AS (
    -- Waiters (Client.wait): the batch's ids on {schema}.finished, in as few notifications as fit
    -- PostgreSQL's 8000-byte payload (300 ids of up to 20 digits and a comma each).
    SELECT pg_notify('{schema}.finished', string_agg(f.id::text, ','))
    FROM (SELECT u.id, (row_number() OVER () - 1) / 300 AS part FROM u) f GROUP BY f.part
), progressed AS (
    -- Finished document tasks tell watchers (`jobq watch`).
    SELECT pg_notify('{schema}.progress', u.id || ',' || u.doc_id || ',1') FROM u WHERE u.doc_id IS NOT NULL
)
SELECT count(*)::int AS written, COALESCE(array_agg(u.id ORDER BY u.id) FILTER (WHERE u.has_dependents), '{}') AS parents,
       (SELECT COALESCE(array_agg(n.id), '{}') FROM n WHERE n.held) AS held,
       (SELECT count(*) FROM progressed) AS progressed, (SELECT count(*) FROM finished) AS notified
FROM u;

-- name: progress_many
-- Coalesced progress for many tasks in one statement, rows locked in id order (see finish_many).
-- Progress never goes backwards except to -1, and -1 sticks unless a value >= 1 arrives. Returns,
-- per task still ours, whether a cancel was requested; a task missing from the result is no longer
-- ours (lease lost, or another worker holds it). The same attempt may still write its last lines
-- once it finished (a flush racing the handler's own completion), but no longer moves the progress,
-- and the lines go before the log's last line, which stays the final state's ("Done in 1.20s.",
-- "[Canceled] ..."). Likewise once a cancel was requested: the request's line stays below what the
-- handler reported before it stopped.
-- Rows looked up and locked by primary key one by one, in id order (see finish_many: as a join, 3,000
-- tasks among 20,000 running rows with stale statistics took 25-32 s).
WITH d AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::real[], $4::text[]) AS d(id, attempt, progress, lines)
    ORDER BY d.id
), mine AS MATERIALIZED (
    SELECT d.* FROM d CROSS JOIN LATERAL (
        SELECT 1 FROM {schema}.tasks t
        WHERE t.id = d.id AND t.attempt = d.attempt AND t.worker_id = $6 AND t.status NOT IN ('queued', 'waiting')
        FOR NO KEY UPDATE OF t
    ) AS k
), u AS (
    UPDATE {schema}.tasks t
    SET progress = CASE WHEN t.status <> 'running' OR d.progress IS NULL THEN t.progress
                        WHEN d.progress < 0 THEN -1
                        WHEN t.progress < 0 AND d.progress < 1 THEN t.progress
                        ELSE greatest(t.progress, least(d.progress, 1)) END,
        progress_msg = CASE WHEN (t.status <> 'running' OR t.cancel_requested_at IS NOT NULL)
                                 AND t.progress_msg <> '' AND d.lines <> ''
            THEN {schema}.append_log({schema}.append_log(COALESCE(substring(t.progress_msg FROM '^(.*)\n'), ''),
                                                         d.lines, $5),
                                     substring(t.progress_msg FROM '[^\n]*$'), $5)
            ELSE {schema}.append_log(t.progress_msg, d.lines, $5) END
    FROM mine d
    WHERE t.id = ANY($1::bigint[]) AND t.id = d.id
    RETURNING t.id, t.attempt, t.doc_id, t.progress, t.cancel_requested_at IS NOT NULL AS cancel_requested
)
SELECT u.id, u.attempt, u.cancel_requested,
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
-- it is registered once, then touched when its lock is free. $10 is the number of hard-timed-out
-- handler threads that have not returned (they hold slots; `jobq top` shows them).
WITH registered AS (
    INSERT INTO {schema}.workers (id, host, pid, types, concurrency, version, lease_seconds, abandoned)
    SELECT $1, $2, $3, $4, $5, $6, $7, $10
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.workers WHERE id = $1)
    ON CONFLICT (id) DO NOTHING
), me AS (
    SELECT id FROM {schema}.workers WHERE id = $1 FOR UPDATE SKIP LOCKED
), touched AS (
    UPDATE {schema}.workers w SET last_seen = now(), stopped_at = NULL, lease_seconds = $7, abandoned = $10
    FROM me WHERE w.id = me.id
), mine AS MATERIALIZED (
    SELECT p.id, p.attempt FROM unnest($8::bigint[], $9::int[]) AS p(id, attempt) ORDER BY p.id
), locked AS MATERIALIZED (
    -- One primary-key lookup per pair, in id order, whatever the statistics (see finish_many: as a
    -- join, 3,000 pairs among 20,000 running rows with stale statistics took 40-49 s, longer than a
    -- lease). One row per pair; k.id is NULL where the row is not ours or was skipped (locked).
    SELECT m.id, m.attempt, k.id AS locked_id FROM mine m LEFT JOIN LATERAL (
        SELECT t.id FROM {schema}.tasks t
        WHERE t.id = m.id AND t.attempt = m.attempt AND t.worker_id = $1 AND t.status = 'running'
        FOR UPDATE OF t SKIP LOCKED
    ) AS k ON true
), l AS (
    UPDATE {schema}.tasks t
    SET lease_expires_at = now() + make_interval(secs => $7)
    FROM locked
    WHERE t.id = ANY($8::bigint[]) AND t.id = locked.locked_id
    RETURNING t.id
)
-- Every locked row is renewed (the update cannot miss a row this statement holds locked).
SELECT m.id, m.attempt, s.id IS NOT NULL AS ours, m.locked_id IS NOT NULL AS renewed,
       COALESCE(s.cancel_requested, false) AS cancel_requested
FROM locked m
LEFT JOIN LATERAL (
    SELECT t.id, t.cancel_requested_at IS NOT NULL AS cancel_requested FROM {schema}.tasks t
    WHERE t.id = m.id AND t.attempt = m.attempt AND t.worker_id = $1 AND t.status = 'running'
    OFFSET 0  -- kept a lookup per pair: not flattened into a join the statistics could mis-plan
) AS s ON true;

-- name: confirm_cancel
-- A cancel NOTIFY is only a hint (pg_notify needs no privilege): the attempts among ($2, $3) that
-- this worker ($1) still runs and whose cancel was really requested in the table.
SELECT t.id, t.attempt
FROM unnest($2::bigint[], $3::int[]) AS p(id, attempt)
JOIN {schema}.tasks t ON t.id = p.id AND t.attempt = p.attempt
WHERE t.worker_id = $1 AND t.status = 'running' AND t.cancel_requested_at IS NOT NULL;

-- name: worker_stopped
UPDATE {schema}.workers SET stopped_at = now(), last_seen = now() WHERE id = $1;

-- name: parent_outcomes
-- How the parents of task $1 ended (ctx.parents(): a callback that runs on failure or always).
SELECT p.id, p.type, p.status, p.result::text AS result, p.last_error
FROM {schema}.tasks c JOIN {schema}.tasks p ON p.id = ANY (c.depends_on)
WHERE c.id = $1
ORDER BY p.id;
