"""Cron schedules, one task per (schedule, tick), and dependents that run when a parent fails.

- ``schedules``: one row per periodic task, declared in code (``@task(cron=...)``, upserted by each
  worker at start, ``source = 'code'``) or added at run time (``jobq cron add``, ``source = 'table'``).
  ``next_tick`` is computed by the scheduler (croniter, in Python: PostgreSQL has no cron parser) and
  read by the views and the scheduler's due scan; ``last_tick`` is the latest tick enqueued.
- ``tasks.schedule`` and ``tasks.tick``: the schedule and tick a task was enqueued for. The unique
  index on them is what makes "exactly one task per tick" hold across any number of workers, a
  killed worker and a server restart: no leader's memory, a key the database enforces. It is not
  predicated on status, so a finished tick can never be enqueued a second time (the pruner deletes
  old ticks' tasks; ``last_tick`` moves on in the same transaction, so they are not fired again).
- ``tasks.run_on``: when a waiting task runs relative to its parents. ``success`` (the default, as
  before): all parents done, cancelled as soon as one fails or is cancelled. ``always``: once every
  parent finished, whatever the outcome (a chord's callback). ``failure``: once every parent finished
  and at least one failed or was cancelled; cancelled when they all succeeded. ``cancel_dependents``
  is re-issued to honour it (same signature, so ``cancel_tasks`` and the rescuer keep calling it).
- ``schedules_due``: the schedules, their next tick and the last task fired (``jobq cron ls``,
  ``jobq top``).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from alembic import op

from jobqueue.states import migration_schema, sibling_revision

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def _cancel_dependents_05(s: str) -> str:
    """0005's function (restored by the downgrade; one copy, in 0005)."""
    return str(sibling_revision("0005_roles.py").cancel_dependents_sql(s, create="CREATE OR REPLACE FUNCTION"))


def upgrade() -> None:
    s = migration_schema()
    definer = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
    op.execute(f"""
ALTER TABLE "{s}".tasks ADD COLUMN run_on text NOT NULL DEFAULT 'success'
    CONSTRAINT tasks_run_on_check CHECK (run_on IN ('success', 'always', 'failure'));
ALTER TABLE "{s}".tasks ADD COLUMN schedule text;
ALTER TABLE "{s}".tasks ADD COLUMN tick timestamptz;
CREATE UNIQUE INDEX tasks_schedule_tick_idx ON "{s}".tasks (schedule, tick) WHERE schedule IS NOT NULL;

CREATE TABLE "{s}".schedules (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:-]{{1,48}}$'),
    type        text NOT NULL CHECK (type ~ '^[A-Za-z0-9_.:-]{{1,48}}$'),
    cron        text NOT NULL,
    tz          text NOT NULL DEFAULT 'UTC',
    payload     jsonb NOT NULL DEFAULT '{{}}',
    priority    integer NOT NULL DEFAULT 0,
    max_retries integer CHECK (max_retries IS NULL OR max_retries >= 0),
    -- How many missed ticks one pass enqueues after an outage (the latest ones); NULL: the setting.
    backfill    integer CHECK (backfill IS NULL OR backfill BETWEEN 1 AND 1000),
    paused      boolean NOT NULL DEFAULT false,
    source      text NOT NULL DEFAULT 'table' CHECK (source IN ('code', 'table')),
    last_tick   timestamptz,
    next_tick   timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- The scheduler's scan: what is due, and not paused.
CREATE INDEX schedules_due_idx ON "{s}".schedules (next_tick) WHERE NOT paused;

CREATE VIEW "{s}".schedules_due AS
SELECT s.name, s.type, s.cron, s.tz, s.paused, s.source, s.backfill, s.last_tick, s.next_tick,
       greatest(extract(epoch FROM s.next_tick - now()), 0)::float8 AS next_in_seconds,
       l.id AS last_task_id, l.status AS last_task_status
FROM "{s}".schedules s
LEFT JOIN LATERAL (
    SELECT t.id, t.status FROM "{s}".tasks t
    WHERE t.schedule = s.name ORDER BY t.tick DESC LIMIT 1
) l ON true;

-- The scheduler's write (jobqueue/runtime/maintenance/scheduler.py): one task per (schedule, tick),
-- made from the schedule's row, under the unique key (schedule, tick), which refuses a tick fired
-- before whoever fired it; then each schedule moves on. SECURITY DEFINER: a worker role, which may not
-- INSERT tasks, enqueues exactly what a schedule says and nothing else.
CREATE FUNCTION "{s}".fire_ticks(p_names text[], p_ticks timestamptz[], p_moved text[], p_last timestamptz[],
                                 p_next timestamptz[], p_max_retries integer)
RETURNS TABLE (id bigint, schedule text, tick timestamptz)
LANGUAGE sql {definer} AS $$
    WITH fired AS (
        INSERT INTO "{s}".tasks AS t (type, priority, payload, run_at, max_retries, schedule, tick)
        SELECT s.type, s.priority, s.payload, f.tick, COALESCE(s.max_retries, p_max_retries), s.name, f.tick
        FROM unnest(p_names, p_ticks) AS f(name, tick)
        JOIN "{s}".schedules s ON s.name = f.name
        ORDER BY f.name, f.tick
        ON CONFLICT (schedule, tick) WHERE schedule IS NOT NULL DO NOTHING
        RETURNING t.id, t.schedule, t.tick
    ), moved AS (
        UPDATE "{s}".schedules s
        SET last_tick = COALESCE(m.last_tick, s.last_tick), next_tick = m.next_tick, updated_at = now()
        FROM unnest(p_moved, p_last, p_next) AS m(name, last_tick, next_tick)
        WHERE s.name = m.name
    )
    SELECT fired.id, fired.schedule, fired.tick FROM fired
$$;
REVOKE EXECUTE ON FUNCTION "{s}".fire_ticks(text[], timestamptz[], text[], timestamptz[], timestamptz[], integer)
    FROM PUBLIC;

-- Parents failed or were cancelled: their waiting dependents that run only on success are cancelled
-- (and, in turn, theirs); those that run always or on failure count the parent off and are queued
-- once their last parent finished. Rows locked in id order, one generation at a time.
CREATE OR REPLACE FUNCTION "{s}".cancel_dependents(p_parents bigint[], p_line text, p_max_chars integer)
RETURNS TABLE (id bigint, doc_id bigint, progress real) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_dead bigint[] := p_parents;
    v_ids bigint[];
    v_docs bigint[];
    v_progress real[];
    v_woken bigint;
BEGIN
    WHILE cardinality(v_dead) > 0 LOOP
        WITH child AS MATERIALIZED (
            SELECT c.id, (SELECT count(*) FROM unnest(v_dead) AS p(id) WHERE p.id = ANY (c.depends_on)) AS k
            FROM "{s}".tasks c
            WHERE c.depends_on && v_dead AND c.status = 'waiting'
            ORDER BY c.id
            FOR NO KEY UPDATE OF c
        ), u AS (
            UPDATE "{s}".tasks t
            SET status = CASE WHEN t.run_on = 'success' THEN 'cancelled'
                              WHEN t.pending_deps - child.k <= 0 THEN 'queued' ELSE 'waiting' END,
                pending_deps = CASE WHEN t.run_on = 'success' THEN t.pending_deps
                                    ELSE greatest(t.pending_deps - child.k, 0)::int END,
                run_at = CASE WHEN t.run_on <> 'success' AND t.pending_deps - child.k <= 0
                              THEN greatest(t.run_at, now()) ELSE t.run_at END,
                finished_at = CASE WHEN t.run_on = 'success' THEN now() ELSE t.finished_at END,
                progress_msg = CASE WHEN t.run_on = 'success'
                                    THEN "{s}".append_log(t.progress_msg, p_line, p_max_chars)
                                    ELSE t.progress_msg END
            FROM child
            WHERE t.id = child.id AND t.status = 'waiting'
            RETURNING t.id, t.type, t.status, t.doc_id, t.progress, t.run_at
        )
        SELECT array_agg(u.id ORDER BY u.id) FILTER (WHERE u.status = 'cancelled'),
               array_agg(u.doc_id ORDER BY u.id) FILTER (WHERE u.status = 'cancelled'),
               array_agg(u.progress ORDER BY u.id) FILTER (WHERE u.status = 'cancelled'),
               (SELECT count(*) FROM (SELECT pg_notify('{s}.' || q.type, extract(epoch FROM min(q.run_at))::text)
                                      FROM u q WHERE q.status = 'queued' GROUP BY q.type) n)
        INTO v_ids, v_docs, v_progress, v_woken FROM u;
        RETURN QUERY SELECT x.id, x.doc_id, x.progress
                     FROM unnest(v_ids, v_docs, v_progress) AS x(id, doc_id, progress);
        v_dead := v_ids;
    END LOOP;
END
$$;
""")


def downgrade() -> None:
    s = migration_schema()
    op.execute(_cancel_dependents_05(s) + f"""
DROP FUNCTION IF EXISTS "{s}".fire_ticks(text[], timestamptz[], text[], timestamptz[], timestamptz[], integer);
DROP VIEW IF EXISTS "{s}".schedules_due;
DROP TABLE IF EXISTS "{s}".schedules;
DROP INDEX IF EXISTS "{s}".tasks_schedule_tick_idx;
ALTER TABLE "{s}".tasks DROP COLUMN IF EXISTS tick;
ALTER TABLE "{s}".tasks DROP COLUMN IF EXISTS schedule;
ALTER TABLE "{s}".tasks DROP COLUMN IF EXISTS run_on;
""")
