"""Flow control in the claim: fair claims, per-key concurrency limits, cluster-wide rate limits (issue 14).

- ``flow_key(spec, owner, doc_id, batch_id, payload)``: the key a type is fair, limited or rate
  limited by (a column or ``payload.<field>``; '' when the task has none). An inlinable SQL
  function: with the spec a constant (the flow claim runs with custom plans) it folds to the bare
  column or ``payload ->> 'field'``, so the planner matches it to the type's key index.
- ``flow_rules``: each flow-controlled type's declaration, written by the workers at start through
  ``declare_flow`` (the views read it; the claim takes the worker's own declaration as parameters).
- ``declare_flow(...)``: SECURITY DEFINER, so a worker role that may not create indexes still gets
  the type's key index ``(flow_key, priority DESC, run_at, id) WHERE status = 'queued' AND type = ...``
  that the claim's per-key skip scan and per-key LATERAL use. Only that type's rows pay for it.
  Called with nothing declared, it forgets the type (row and index).
- ``flow_grants``: the sliding window of a rate limit (one row per claim and key; the claim prunes
  what left the window).
- ``flow_control``: per (type, key): queued, running, the limit and the rate, what the window has
  used, whether the key is held back (by 'limit' or 'rate') and for how long.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from alembic import op

from jobqueue.states import migration_schema

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def claim_flow_sql(s: str) -> str:
    """The function claim_flow as this revision creates it (0012 replaces it; its downgrade re-issues this)."""
    return f"""-- The flow-controlled claim (runtime/flow.py), one call: a function so that taking the type's lock
-- and the claim's fresh snapshot after it are one round trip instead of four (BEGIN, lock, claim,
-- COMMIT), which measured about 2 ms of a 5 ms claim. Claims up to p_n tasks of one type p_type
-- for worker p_worker (lease p_lease s); p_key the key spec (owner, doc_id, batch_id,
-- payload.<field>; NULL: one key), p_fair, p_limit per key, p_rate_n tasks per p_rate_secs (a
-- sliding window), p_rate_by_key (else type-wide), p_must_lock (a limit or a rate: take the lock).
--
--   * custom plans for this transaction: the key spec is then a constant, and flow_key(...) folds
--     to the type's key index expression (declare_flow) and the type to its partial predicate;
--   * with a limit, a rate or a max_running cap, the type's cap lock (the one the plain claim of a
--     capped type takes) before the claim's statement, whose snapshot (a volatile function's
--     statements each take one) then sees every claim committed before: counts cannot move;
--   * a skip scan lists the keys that have queued tasks (one index descent each); a LATERAL per
--     key reads its first tasks in claim order, at most its room (the limit minus its running
--     tasks, a per-key rate minus its window's grants); ranked by priority, then (fair) by the key's
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
               cancel_requested boolean)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_locked boolean;
BEGIN
    PERFORM set_config('plan_cache_mode', 'force_custom_plan', true);
    -- A claim lost in a crash is a worker that crashed after claiming (leases and fencing handle it).
    PERFORM set_config('synchronous_commit', 'off', true);
    v_locked := p_must_lock OR EXISTS (SELECT 1 FROM "{s}".queues q
                                       WHERE q.type = p_type AND q.max_running IS NOT NULL);
    IF v_locked THEN
        PERFORM pg_advisory_xact_lock(hashtext('{s}.cap.' || p_type));
    END IF;
    RETURN QUERY
    WITH RECURSIVE clock AS MATERIALIZED (
        SELECT clock_timestamp() AS ts
    ), window_used AS MATERIALIZED (
        SELECT g.key, sum(g.n) AS n
        FROM "{s}".flow_grants g, clock
        WHERE p_rate_n IS NOT NULL AND g.type = p_type AND g.at > clock.ts - make_interval(secs => p_rate_secs)
        GROUP BY g.key
    ), room AS MATERIALIZED (
        SELECT CASE WHEN q.paused THEN 0
                    WHEN q.max_running IS NOT NULL AND NOT v_locked THEN 0
                    ELSE least(p_n,
                               CASE WHEN q.max_running IS NULL THEN p_n
                                    ELSE greatest(0, q.max_running - (
                                         SELECT count(*) FROM "{s}".tasks r
                                         WHERE r.lease_expires_at IS NOT NULL AND r.status = 'running'
                                           AND r.type = p_type))::int END,
                               CASE WHEN p_rate_n IS NULL OR p_rate_by_key THEN p_n
                                    ELSE greatest(0, p_rate_n - (SELECT COALESCE(sum(n), 0) FROM window_used))::int END)
               END AS n
        FROM (SELECT 1) one LEFT JOIN "{s}".queues q ON q.type = p_type
    ), keys AS (
        (SELECT "{s}".flow_key(p_key, t.owner, t.doc_id, t.batch_id, t.payload) AS k
         FROM "{s}".tasks t
         WHERE t.status = 'queued' AND t.type = p_type
         ORDER BY 1 LIMIT 1)
        UNION ALL
        SELECT (SELECT "{s}".flow_key(p_key, t.owner, t.doc_id, t.batch_id, t.payload)
                FROM "{s}".tasks t
                WHERE t.status = 'queued' AND t.type = p_type
                  AND "{s}".flow_key(p_key, t.owner, t.doc_id, t.batch_id, t.payload) > keys.k
                ORDER BY 1 LIMIT 1)
        FROM keys WHERE keys.k IS NOT NULL
    ), running AS MATERIALIZED (
        SELECT "{s}".flow_key(p_key, r.owner, r.doc_id, r.batch_id, r.payload) AS k, count(*) AS n
        FROM "{s}".tasks r
        WHERE r.lease_expires_at IS NOT NULL AND r.status = 'running' AND r.type = p_type
        GROUP BY 1
    ), heads AS (
        SELECT c.id, c.priority, c.run_at, COALESCE(run.n, 0) AS running,
               row_number() OVER (PARTITION BY keys.k, c.priority ORDER BY c.run_at, c.id) AS rn
        FROM keys
        CROSS JOIN room
        LEFT JOIN running run ON run.k = keys.k
        LEFT JOIN window_used u ON p_rate_by_key AND u.key = keys.k
        CROSS JOIN LATERAL (
            SELECT t.id, t.priority, t.run_at
            FROM "{s}".tasks t
            WHERE t.status = 'queued' AND t.type = p_type AND t.run_at <= now()
              AND "{s}".flow_key(p_key, t.owner, t.doc_id, t.batch_id, t.payload) = keys.k
            ORDER BY t.priority DESC, t.run_at, t.id
            LIMIT least(room.n,
                        CASE WHEN p_limit IS NULL THEN room.n ELSE greatest(0, p_limit - COALESCE(run.n, 0)) END,
                        CASE WHEN p_rate_n IS NULL OR NOT p_rate_by_key THEN room.n
                             ELSE greatest(0, p_rate_n - COALESCE(u.n, 0)) END)
        ) c
        WHERE keys.k IS NOT NULL
    ), chosen AS (
        SELECT h.id FROM heads h
        ORDER BY h.priority DESC, CASE WHEN p_fair THEN h.running + h.rn ELSE 0 END, h.run_at, h.id
        LIMIT (SELECT n FROM room)
    ), locked AS (
        SELECT t.id FROM "{s}".tasks t
        WHERE t.id IN (SELECT id FROM chosen) AND t.status = 'queued'
        FOR UPDATE SKIP LOCKED
    ), started AS (
        UPDATE "{s}".tasks t
        SET status = 'running', worker_id = p_worker, attempt = t.attempt + 1, started_at = clock.ts,
            lease_expires_at = clock.ts + make_interval(secs => p_lease)
        FROM locked, clock
        WHERE t.id = locked.id
        RETURNING t.*, "{s}".flow_key(p_key, t.owner, t.doc_id, t.batch_id, t.payload) AS flow_key
    ), granted AS (
        INSERT INTO "{s}".flow_grants (type, key, at, n)
        SELECT p_type, CASE WHEN p_rate_by_key THEN s.flow_key ELSE '' END, clock.ts, count(*)
        FROM started s, clock
        WHERE p_rate_n IS NOT NULL
        GROUP BY 2, 3
    ), pruned AS (
        DELETE FROM "{s}".flow_grants g USING clock
        WHERE p_rate_n IS NOT NULL AND g.type = p_type AND g.at <= clock.ts - make_interval(secs => p_rate_secs)
    )
    SELECT s.id, s.type, s.priority, s.payload::text AS payload, s.attempt, s.retry_count, s.max_retries,
           s.created_at, s.run_at, s.doc_id, s.batch_id, s.from_page, s.to_page, s.owner, s.labels,
           s.digest, s.cancel_requested_at IS NOT NULL AS cancel_requested
    FROM started s;
END
$fn$;
"""


# The live rows flow_control counts per (type, key): 0012 replaces this with index-driven reads.
KEYED = """
    SELECT t.type, "{s}".flow_key(r.key, t.owner, t.doc_id, t.batch_id, t.payload) AS key,
           count(*) FILTER (WHERE t.status = 'queued' AND t.run_at <= now()) AS queued,
           count(*) FILTER (WHERE t.status = 'running') AS running
    FROM "{s}".tasks t JOIN "{s}".flow_rules r ON r.type = t.type
    WHERE t.status IN ('queued', 'running')
    GROUP BY 1, 2
"""


def flow_control_sql(s: str, *, keyed: str = KEYED, create: str = "CREATE VIEW") -> str:
    """flow_control's DDL with its `keyed` CTE (`{s}` in it stands for the schema) as a parameter: one
    copy of the view for 0009 and the revisions that re-issue it."""
    return f"""{create} "{s}".flow_control AS
WITH keyed AS ({keyed.replace("{s}", s)}), used AS (
    SELECT g.type, g.key, sum(g.n) AS used, min(g.at) AS oldest
    FROM "{s}".flow_grants g JOIN "{s}".flow_rules r ON r.type = g.type
    WHERE g.at > now() - make_interval(secs => r.rate_secs)
    GROUP BY 1, 2
), judged AS (
    SELECT k.type, k.key, r.fair, k.queued, k.running, r.max_per_key, r.rate_n, r.rate_secs, r.rate_by_key,
           COALESCE(u.used, 0) AS rate_used, u.oldest,
           CASE WHEN k.queued = 0 THEN NULL
                WHEN r.max_per_key IS NOT NULL AND k.running >= r.max_per_key THEN 'limit'
                WHEN r.rate_n IS NOT NULL AND COALESCE(u.used, 0) >= r.rate_n THEN 'rate' END AS held_by
    FROM keyed k JOIN "{s}".flow_rules r ON r.type = k.type
    LEFT JOIN used u ON u.type = k.type AND u.key = CASE WHEN r.rate_by_key THEN k.key ELSE '' END
)
SELECT type, key, fair, queued, running, max_per_key, rate_n, rate_secs, rate_by_key, rate_used, held_by,
       CASE WHEN held_by IS NULL THEN 0 ELSE queued END AS held_back,
       -- How long until the key may start a task again: the oldest grant leaving the rate window
       -- (NULL when held by a limit: that waits for a running task to end).
       CASE WHEN held_by = 'rate'
            THEN greatest(0, extract(epoch FROM oldest + make_interval(secs => rate_secs) - now()))::float8 END
           AS wait_seconds
FROM judged;
"""


def upgrade() -> None:
    s = migration_schema()
    op.execute(f"""
-- Not STRICT and a single SELECT, so the planner inlines it; COALESCE: a task without the key value
-- shares the key '' (one more tenant, never an error).
CREATE FUNCTION "{s}".flow_key(spec text, owner text, doc_id bigint, batch_id bigint, payload jsonb)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT COALESCE(CASE spec WHEN 'owner' THEN owner
                              WHEN 'doc_id' THEN doc_id::text
                              WHEN 'batch_id' THEN batch_id::text
                              ELSE payload ->> substr(spec, 9) END, '')
$$;

CREATE TABLE "{s}".flow_rules (
    type        text PRIMARY KEY,
    key         text,              -- owner | doc_id | batch_id | payload.<field>; NULL: the type as a whole
    fair        boolean NOT NULL DEFAULT false,
    max_per_key integer CHECK (max_per_key IS NULL OR max_per_key > 0),
    rate_n      integer CHECK (rate_n IS NULL OR rate_n > 0),
    rate_secs   double precision CHECK (rate_secs IS NULL OR rate_secs > 0),
    rate_by_key boolean NOT NULL DEFAULT false,
    index_name  text,
    declared_by text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per claim and key within a rate window; key '' holds a type-wide rate.
CREATE TABLE "{s}".flow_grants (
    type text NOT NULL,
    key  text NOT NULL,
    at   timestamptz NOT NULL,
    n    integer NOT NULL
);
CREATE INDEX flow_grants_idx ON "{s}".flow_grants (type, key, at);

{claim_flow_sql(s)}
CREATE FUNCTION "{s}".declare_flow(p_type text, p_key text, p_fair boolean, p_limit integer, p_rate_n integer,
                                   p_rate_secs double precision, p_rate_by_key boolean, p_worker text)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_prefix text := 'tasks_flow_' || left(md5(p_type), 10) || '_';
    v_index text;
    v_old record;
BEGIN
    -- Workers starting together: one builds the index, the others find it.
    PERFORM pg_advisory_xact_lock(hashtext('{s}.declare_flow'));
    IF p_key IS NOT NULL THEN
        v_index := v_prefix || left(md5(p_key), 8);
        IF to_regclass(format('%I.%I', '{s}', v_index)) IS NULL THEN
            EXECUTE format('CREATE INDEX %I ON %I.tasks (%I.flow_key(%L, owner, doc_id, batch_id, payload), '
                           'priority DESC, run_at, id) WHERE status = %L AND type = %L',
                           v_index, '{s}', '{s}', p_key, 'queued', p_type);
        END IF;
    END IF;
    FOR v_old IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = '{s}' AND c.relkind = 'i' AND c.relname LIKE v_prefix || '%'
                   AND c.relname IS DISTINCT FROM v_index LOOP
        EXECUTE format('DROP INDEX %I.%I', '{s}', v_old.relname);
    END LOOP;
    IF p_key IS NULL AND NOT p_fair AND p_limit IS NULL AND p_rate_n IS NULL THEN
        -- The type lost its declaration: it leaves the view (its key index is gone above).
        DELETE FROM "{s}".flow_rules WHERE type = p_type;
        DELETE FROM "{s}".flow_grants WHERE type = p_type;
        RETURN NULL;
    END IF;
    INSERT INTO "{s}".flow_rules AS r (type, key, fair, max_per_key, rate_n, rate_secs, rate_by_key, index_name,
                                       declared_by, updated_at)
    VALUES (p_type, p_key, p_fair, p_limit, p_rate_n, p_rate_secs, p_rate_by_key, v_index, p_worker, now())
    ON CONFLICT (type) DO UPDATE
    SET key = EXCLUDED.key, fair = EXCLUDED.fair, max_per_key = EXCLUDED.max_per_key, rate_n = EXCLUDED.rate_n,
        rate_secs = EXCLUDED.rate_secs, rate_by_key = EXCLUDED.rate_by_key, index_name = EXCLUDED.index_name,
        declared_by = EXCLUDED.declared_by, updated_at = now()
    WHERE (r.key, r.fair, r.max_per_key, r.rate_n, r.rate_secs, r.rate_by_key, r.index_name)
          IS DISTINCT FROM (EXCLUDED.key, EXCLUDED.fair, EXCLUDED.max_per_key, EXCLUDED.rate_n,
                            EXCLUDED.rate_secs, EXCLUDED.rate_by_key, EXCLUDED.index_name);
    RETURN v_index;
END
$$;
REVOKE EXECUTE ON FUNCTION "{s}".declare_flow(text, text, boolean, integer, integer, double precision, boolean, text)
    FROM PUBLIC;

{flow_control_sql(s)}""")


def downgrade() -> None:
    s = migration_schema()
    op.execute(f"""
DO $do$
DECLARE v record;
BEGIN
    FOR v IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = '{s}' AND c.relkind = 'i' AND c.relname LIKE 'tasks_flow_%' LOOP
        EXECUTE format('DROP INDEX %I.%I', '{s}', v.relname);
    END LOOP;
END
$do$;
DROP VIEW "{s}".flow_control;
DROP FUNCTION "{s}".claim_flow(text, integer, text, double precision, text, boolean, integer, integer,
                               double precision, boolean, boolean);
DROP FUNCTION "{s}".declare_flow(text, text, boolean, integer, integer, double precision, boolean, text);
DROP TABLE "{s}".flow_grants;
DROP TABLE "{s}".flow_rules;
DROP FUNCTION "{s}".flow_key(text, text, bigint, bigint, jsonb);
""")
