"""The flow-controlled claim plans once per session and type, not once per call (issue 14).

0009's ``claim_flow`` ran its statement with custom plans, so that the key spec and the type were
constants the planner could match to the type's key index (``declare_flow``); planning that
statement was most of the claim (about 5 of 8 ms, against 1.8 ms of execution, 200,000 queued rows
of five tenants), and made a fair drain about half as fast as a plain one.

Now the function prepares the statement once per session and (type, key spec), with the type and
the key spec written into its text as literals and everything else as parameters, and executes the
prepared statement with a generic plan: the literals still fold into the key index's expression and
partial predicate, and the plan is made once. A session that lost its prepared statements (DISCARD
ALL of a pooler) prepares it again on its next claim; a changed index invalidates the plan the
usual way. Each key's tasks are read from the key's first live task on (the skip scan that lists
the keys finds it), instead of from the start of the key's index range, where the entries of the
tasks claimed a moment ago pile up while an older transaction holds the xmin horizon. The claim
also returns ``trace_context`` now, like the plain claim (0011).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from alembic import op

from jobqueue.states import migration_schema, sibling_revision

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

SIGNATURE = (
    "(text, integer, text, double precision, text, boolean, integer, integer, double precision, boolean, boolean)"
)


def upgrade() -> None:
    s = migration_schema()
    op.execute(f"""
DROP FUNCTION "{s}".claim_flow{SIGNATURE};

-- The flow-controlled claim (runtime/flow.py), one call: the type's lock and the claim's fresh
-- snapshot after it in one round trip. Claims up to p_n tasks of type p_type for worker p_worker
-- (lease p_lease s); p_key the key spec (owner, doc_id, batch_id, payload.<field>; NULL: one key),
-- p_fair, p_limit per key, p_rate_n tasks per p_rate_secs (a sliding window), p_rate_by_key (else
-- type-wide), p_must_lock (a limit or a rate: take the lock).
--
--   * the statement is prepared once per session and (schema, type, key spec), its name a hash of
--     them, with p_type and p_key as literals (flow_key(...) folds to the type's key index
--     expression, the type to its partial predicate) and executed with a generic plan: planned once;
--   * with a limit, a rate or a max_running cap, the type's cap lock (the one the plain claim of a
--     capped type takes) before the statement, whose snapshot (each statement of a volatile
--     function takes one) then sees every claim committed before: counts cannot move;
--   * a skip scan lists the keys that have queued tasks and each key's first task (one index descent
--     each); a LATERAL per key reads its tasks in claim order from that first one on, so the index
--     entries of tasks claimed a moment ago (not yet dead to every snapshot while an older
--     transaction runs) are stepped over once per claim, not twice; at most the
--     key's room (the limit minus its running tasks, a per-key rate minus its window's grants);
--     ranked by priority, then (fair) by the key's
--     running tasks plus the task's rank within the key, so keys take turns and a key with nothing
--     running goes first; locked with SKIP LOCKED and re-checked as queued;
--   * started_at and the window's grant are one clock_timestamp() read under the lock, so an audit
--     of started_at agrees with the window; grants that left the window are pruned here.
CREATE FUNCTION "{s}".claim_flow(p_type text, p_n integer, p_worker text, p_lease double precision,
                                 p_key text, p_fair boolean, p_limit integer, p_rate_n integer,
                                 p_rate_secs double precision, p_rate_by_key boolean, p_must_lock boolean)
RETURNS TABLE (id bigint, type text, priority integer, payload text, attempt integer, retry_count integer,
               max_retries integer, created_at timestamptz, run_at timestamptz, doc_id bigint, batch_id bigint,
               from_page integer, to_page integer, owner text, labels text[], digest text,
               cancel_requested boolean, trace_context text)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_locked boolean;
    v_plan text := 'jobq_claim_flow_0012_' || md5(concat_ws('/', '{s}', p_type, p_key));
BEGIN
    -- A claim lost in a crash is a worker that crashed after claiming (leases and fencing handle it).
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    v_locked := p_must_lock OR EXISTS (SELECT 1 FROM "{s}".queues q
                                       WHERE q.type = p_type AND q.max_running IS NOT NULL);
    IF v_locked THEN
        PERFORM pg_advisory_xact_lock(hashtext('{s}.cap.' || p_type));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_prepared_statements ps WHERE ps.name = v_plan) THEN
        -- $1 n, $2 worker, $3 lease, $4 fair, $5 limit, $6 rate_n, $7 rate_secs, $8 rate_by_key, $9 locked
        EXECUTE format($q$PREPARE %3$I (integer, text, double precision, boolean, integer, integer,
                                        double precision, boolean, boolean) AS
    WITH RECURSIVE clock AS MATERIALIZED (
        SELECT clock_timestamp() AS ts
    ), window_used AS MATERIALIZED (
        SELECT g.key, sum(g.n) AS n
        FROM "{s}".flow_grants g, clock
        WHERE $6 IS NOT NULL AND g.type = %1$L AND g.at > clock.ts - make_interval(secs => $7)
        GROUP BY g.key
    ), room AS MATERIALIZED (
        SELECT CASE WHEN q.paused THEN 0
                    WHEN q.max_running IS NOT NULL AND NOT $9 THEN 0
                    ELSE least($1,
                               CASE WHEN q.max_running IS NULL THEN $1
                                    ELSE greatest(0, q.max_running - (
                                         SELECT count(*) FROM "{s}".tasks r
                                         WHERE r.lease_expires_at IS NOT NULL AND r.status = 'running'
                                           AND r.type = %1$L))::int END,
                               CASE WHEN $6 IS NULL OR $8 THEN $1
                                    ELSE greatest(0, $6 - (SELECT COALESCE(sum(n), 0) FROM window_used))::int END)
               END AS n
        FROM (SELECT 1) one LEFT JOIN "{s}".queues q ON q.type = %1$L
    ), keys AS (
        -- Each key with queued tasks and its first task in claim order: one index descent per key.
        (SELECT "{s}".flow_key(%2$L, t.owner, t.doc_id, t.batch_id, t.payload) AS k,
                t.priority AS p, t.run_at AS r, t.id AS i
         FROM "{s}".tasks t
         WHERE t.status = 'queued' AND t.type = %1$L
         ORDER BY 1, t.priority DESC, t.run_at, t.id LIMIT 1)
        UNION ALL
        SELECT nxt.k, nxt.p, nxt.r, nxt.i
        FROM keys CROSS JOIN LATERAL (
            SELECT "{s}".flow_key(%2$L, t.owner, t.doc_id, t.batch_id, t.payload) AS k,
                   t.priority AS p, t.run_at AS r, t.id AS i
            FROM "{s}".tasks t
            WHERE t.status = 'queued' AND t.type = %1$L
              AND "{s}".flow_key(%2$L, t.owner, t.doc_id, t.batch_id, t.payload) > keys.k
            ORDER BY 1, t.priority DESC, t.run_at, t.id LIMIT 1) nxt
    ), running AS MATERIALIZED (
        SELECT "{s}".flow_key(%2$L, r.owner, r.doc_id, r.batch_id, r.payload) AS k, count(*) AS n
        FROM "{s}".tasks r
        WHERE ($4 OR $5 IS NOT NULL)  -- only fairness and limits look at them (not a rate alone)
          AND r.lease_expires_at IS NOT NULL AND r.status = 'running' AND r.type = %1$L
        GROUP BY 1
    ), heads AS (
        SELECT c.id, c.priority, c.run_at, COALESCE(run.n, 0) AS running,
               row_number() OVER (PARTITION BY keys.k, c.priority ORDER BY c.run_at, c.id) AS rn
        FROM keys
        CROSS JOIN room
        LEFT JOIN running run ON run.k = keys.k
        LEFT JOIN window_used u ON $8 AND u.key = keys.k
        CROSS JOIN LATERAL (
            SELECT least(room.n,
                         CASE WHEN $5 IS NULL THEN room.n ELSE greatest(0, $5 - COALESCE(run.n, 0)) END,
                         CASE WHEN $6 IS NULL OR NOT $8 THEN room.n ELSE greatest(0, $6 - COALESCE(u.n, 0)) END) AS n
        ) lim
        CROSS JOIN LATERAL (
            -- From the key's first task on (not from the start of the key's index range, where the
            -- entries of tasks claimed a moment ago lie until they are dead to every snapshot), then
            -- the key's lower priorities.
            (SELECT t.id, t.priority, t.run_at
             FROM "{s}".tasks t
             WHERE t.status = 'queued' AND t.type = %1$L AND t.run_at <= now()
               AND "{s}".flow_key(%2$L, t.owner, t.doc_id, t.batch_id, t.payload) = keys.k
               AND t.priority = keys.p AND (t.run_at, t.id) >= (keys.r, keys.i)
             ORDER BY t.priority DESC, t.run_at, t.id LIMIT lim.n)
            UNION ALL
            (SELECT t.id, t.priority, t.run_at
             FROM "{s}".tasks t
             WHERE t.status = 'queued' AND t.type = %1$L AND t.run_at <= now()
               AND "{s}".flow_key(%2$L, t.owner, t.doc_id, t.batch_id, t.payload) = keys.k
               AND t.priority < keys.p
             ORDER BY t.priority DESC, t.run_at, t.id LIMIT lim.n)
            LIMIT lim.n
        ) c
    ), chosen AS (
        SELECT h.id FROM heads h
        ORDER BY h.priority DESC, CASE WHEN $4 THEN h.running + h.rn ELSE 0 END, h.run_at, h.id
        LIMIT (SELECT n FROM room)
    ), locked AS (
        SELECT t.id FROM "{s}".tasks t
        WHERE t.id IN (SELECT id FROM chosen) AND t.status = 'queued'
        FOR UPDATE SKIP LOCKED
    ), started AS (
        UPDATE "{s}".tasks t
        SET status = 'running', worker_id = $2, attempt = t.attempt + 1, started_at = clock.ts,
            lease_expires_at = clock.ts + make_interval(secs => $3)
        FROM locked, clock
        WHERE t.id = locked.id
        RETURNING t.*, "{s}".flow_key(%2$L, t.owner, t.doc_id, t.batch_id, t.payload) AS flow_key
    ), granted AS (
        INSERT INTO "{s}".flow_grants (type, key, at, n)
        SELECT %1$L, CASE WHEN $8 THEN s.flow_key ELSE '' END, clock.ts, count(*)
        FROM started s, clock
        WHERE $6 IS NOT NULL
        GROUP BY 2, 3
    ), pruned AS (
        DELETE FROM "{s}".flow_grants g USING clock
        WHERE $6 IS NOT NULL AND g.type = %1$L AND g.at <= clock.ts - make_interval(secs => $7)
    )
    SELECT s.id, s.type, s.priority, s.payload::text AS payload, s.attempt, s.retry_count, s.max_retries,
           s.created_at, s.run_at, s.doc_id, s.batch_id, s.from_page, s.to_page, s.owner, s.labels,
           s.digest, s.cancel_requested_at IS NOT NULL AS cancel_requested, s.trace_context::text AS trace_context
    FROM started s$q$, p_type, p_key, v_plan);
    END IF;
    RETURN QUERY EXECUTE format('EXECUTE %I(%L, %L, %L, %L, %L, %L, %L, %L, %L)', v_plan, p_n, p_worker, p_lease,
                                p_fair, p_limit, p_rate_n, p_rate_secs, p_rate_by_key, v_locked);
END
$fn$;
""")


def downgrade() -> None:
    s = migration_schema()
    op.execute(f'DROP FUNCTION "{s}".claim_flow{SIGNATURE};\n'
               + sibling_revision("0009_flow_control.py").claim_flow_sql(s))
