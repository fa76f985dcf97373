"""The tasks table (the queue), the workers registry, per-type queue settings, wake-up trigger.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from alembic import op

from jobqueue.states import migration_schema

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def append_log_sql(s: str, create: str = "CREATE FUNCTION") -> str:
    """0001's append_log, also what 0015's downgrade puts back (one copy of its text)."""
    return f"""-- Append lines to a bounded log, keeping the newest max_chars and cutting at a line boundary.
{create} "{s}".append_log(log text, lines text, max_chars integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN lines IS NULL OR lines = '' THEN log
        WHEN length(log) + length(lines) + 1 <= max_chars
            THEN CASE WHEN log = '' THEN lines ELSE log || E'\\n' || lines END
        ELSE (SELECT CASE WHEN strpos(t, E'\\n') > 0 THEN substr(t, strpos(t, E'\\n') + 1) ELSE t END
              FROM (SELECT right(CASE WHEN log = '' THEN lines ELSE log || E'\\n' || lines END,
                                 max_chars) AS t) cut)
    END
$$;
"""


def upgrade() -> None:
    s = migration_schema()
    op.execute(f"""
CREATE TABLE "{s}".tasks (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The task type is also the queue name and part of a NOTIFY channel name (63 bytes at most).
    type                text NOT NULL CHECK (type ~ '^[A-Za-z0-9_.:-]{{1,48}}$'),
    priority            integer NOT NULL DEFAULT 0,
    status              text NOT NULL DEFAULT 'queued'
                        CHECK (status IN ('waiting', 'queued', 'running', 'done', 'failed', 'cancelled')),
    -- The payload ceiling holds whatever client writes the row (Python checks a tighter limit first).
    -- Measured as JSON text: pg_column_size would see an already-compressed value as small.
    payload             jsonb NOT NULL DEFAULT '{{}}' CHECK (octet_length(payload::text) <= 2097152),
    run_at              timestamptz NOT NULL DEFAULT now(),
    doc_id              bigint,
    batch_id            bigint,
    from_page           integer,
    to_page             integer,
    owner               text,
    labels              text[] NOT NULL DEFAULT '{{}}',
    dedupe_key          text,
    digest              text,
    depends_on          bigint[],
    pending_deps        integer NOT NULL DEFAULT 0,
    has_dependents      boolean NOT NULL DEFAULT false,
    progress            real NOT NULL DEFAULT 0 CHECK (progress >= -1 AND progress <= 1),
    progress_msg        text NOT NULL DEFAULT '',
    retry_count         integer NOT NULL DEFAULT 0,
    max_retries         integer NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    result              jsonb,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    process_duration    double precision,
    worker_id           text,
    attempt             integer NOT NULL DEFAULT 0,
    lease_expires_at    timestamptz,
    cancel_requested_at timestamptz
) WITH (
    -- Room on each page so progress updates (no indexed column touched) stay HOT.
    fillfactor = 80,
    -- A queue table churns: vacuum after a fixed number of dead rows, not a fraction of history.
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_insert_scale_factor = 0.05
);

-- The claim: only queued rows are in it, in claim order, so its size follows the backlog, not history.
CREATE INDEX tasks_claim_idx ON "{s}".tasks (type, priority DESC, run_at, id) WHERE status = 'queued';
-- The rescuer's scan of expired leases (only running tasks hold one). Deliberately not predicated on
-- status = 'running': with that predicate the planner, whose statistics often date from a moment with
-- no running task, picks this index for the completion's `status = 'running'` filter and scans every
-- running row per completed task.
CREATE INDEX tasks_lease_idx ON "{s}".tasks (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
-- Dedupe holds while a task is live; a finished task frees its key.
CREATE UNIQUE INDEX tasks_dedupe_idx ON "{s}".tasks (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status IN ('waiting', 'queued', 'running');
-- Dependency release looks up waiting children by parent id; empty unless dependencies are used.
CREATE INDEX tasks_depends_idx ON "{s}".tasks USING gin (depends_on) WHERE status = 'waiting';
-- Dashboards' recent windows and the pruner read finished rows by time; costs one entry per completion.
CREATE INDEX tasks_finished_idx ON "{s}".tasks (finished_at) WHERE finished_at IS NOT NULL;
-- Document roll-up and `jobq cancel --doc`.
CREATE INDEX tasks_doc_idx ON "{s}".tasks (doc_id) WHERE doc_id IS NOT NULL;
CREATE INDEX tasks_owner_idx ON "{s}".tasks (owner, id) WHERE owner IS NOT NULL;

CREATE TABLE "{s}".workers (
    id          text PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    types       text[] NOT NULL,
    concurrency integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    stopped_at  timestamptz,
    done        bigint NOT NULL DEFAULT 0,
    failed      bigint NOT NULL DEFAULT 0,
    version     text
);

-- Per-type settings shared by every worker: a cluster-wide cap on running tasks, and pause.
CREATE TABLE "{s}".queues (
    type        text PRIMARY KEY,
    max_running integer CHECK (max_running IS NULL OR max_running >= 0),
    paused      boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

{append_log_sql(s)}

-- One NOTIFY per task type per INSERT statement (a COPY of 10,000 rows sends one), fired on commit
-- only, for rows written by jobq and by plain SQL alike. The payload is the earliest run_at as epoch
-- seconds, so a worker can set a timer for tasks scheduled later.
CREATE FUNCTION "{s}".notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT type, min(run_at) AS run_at FROM new_rows WHERE status = 'queued' GROUP BY type LOOP
        PERFORM pg_notify('{s}.' || r.type, extract(epoch FROM r.run_at)::text);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify_insert AFTER INSERT ON "{s}".tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION "{s}".notify_insert();
""")


def downgrade() -> None:
    s = migration_schema()
    op.execute(f"""
DROP TABLE IF EXISTS "{s}".tasks;
DROP TABLE IF EXISTS "{s}".workers;
DROP TABLE IF EXISTS "{s}".queues;
DROP FUNCTION IF EXISTS "{s}".notify_insert();
DROP FUNCTION IF EXISTS "{s}".append_log(text, text, integer);
""")
