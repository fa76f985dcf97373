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
Revises: 0006 (chained after the parallel revisions when merged)
Create Date: 2026-12-03
"""

from alembic import op

from jobqueue.states import migration_schema

revision = "0009"
down_revision = "0006"
branch_labels = None
depends_on = None


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

CREATE VIEW "{s}".flow_control AS
WITH keyed AS (
    SELECT t.type, "{s}".flow_key(r.key, t.owner, t.doc_id, t.batch_id, t.payload) AS key,
           count(*) FILTER (WHERE t.status = 'queued' AND t.run_at <= now()) AS queued,
           count(*) FILTER (WHERE t.status = 'running') AS running
    FROM "{s}".tasks t JOIN "{s}".flow_rules r ON r.type = t.type
    WHERE t.status IN ('queued', 'running')
    GROUP BY 1, 2
), used AS (
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
""")


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
DROP FUNCTION "{s}".declare_flow(text, text, boolean, integer, integer, double precision, boolean, text);
DROP TABLE "{s}".flow_grants;
DROP TABLE "{s}".flow_rules;
DROP FUNCTION "{s}".flow_key(text, text, bigint, bigint, jsonb);
""")
