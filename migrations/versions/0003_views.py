"""Observation views over the queue: queue_depth, throughput, latency, worker_health, failures.

Every view reads only what is cheap to find in a table holding millions of finished rows: live rows
through the partial indexes of 0001 (claim index for queued rows, lease index for running rows) and
finished rows through tasks_finished_idx restricted to a recent window. Each live status is read by
its own UNION ALL branch with an equality on status, because only an equality lets the planner
prove a partial index's predicate; one ``status IN (...)`` would fall back to a scan of the table.
Running rows are read with ``lease_expires_at IS NOT NULL`` too, which is tasks_lease_idx's predicate:
every running task holds a lease (the claim sets it, every way out of running clears it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from alembic import op

from jobqueue.states import migration_schema

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# When an attempt that was put back for a retry ended: a rescued attempt (its worker died) has no
# duration of its own, the rescue stamped run_at; a failed attempt ended started_at + its duration.
_RETRY_AT = """CASE WHEN t.last_error LIKE 'worker % lost (lease expired)'
                 OR t.started_at IS NULL OR t.process_duration IS NULL THEN t.run_at
            ELSE t.started_at + t.process_duration * interval '1 second' END"""

# The grouping key of an error: its last line (a traceback ends with "Type: message"), with numbers
# and addresses folded, so "task 17 failed" and "task 18 failed" are one error.
_ERROR_KEY = r"""CASE WHEN r.last_error LIKE 'worker % lost (lease expired)'
                 THEN 'worker lost (lease expired)'
            ELSE left(regexp_replace(substring(rtrim(r.last_error, E' \n\r\t') FROM '[^\n]*$'),
                                     '0x[0-9a-fA-F]+|[0-9]+', 'N', 'g'), 200) END"""

_LATENCY_WINDOWS = (("5m", 300), ("1h", 3600), ("24h", 86400))


def _latency_branch(s: str, label: str, seconds: int) -> str:
    wait = "greatest(0, extract(epoch FROM t.started_at - t.run_at))::double precision"
    return f"""
    SELECT t.type, '{label}'::text AS period, {seconds} AS period_seconds, count(*) AS tasks,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY {wait}) AS wait_p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY {wait}) AS wait_p95,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY {wait}) AS wait_p99,
           max({wait}) AS wait_max,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY t.process_duration) AS run_p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY t.process_duration) AS run_p95,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY t.process_duration) AS run_p99,
           max(t.process_duration) AS run_max
    FROM "{s}".tasks t
    WHERE t.finished_at >= now() - interval '{seconds} seconds' AND t.started_at IS NOT NULL
    GROUP BY t.type"""


# How long a worker may go unseen before worker_health calls it stale (0004 reads a column instead).
_STALE_AFTER = "interval '30 seconds'"


def views_sql(s: str, *, retry_at: str = _RETRY_AT, error_key: str = _ERROR_KEY, stale_after: str = _STALE_AFTER,
              worker_columns: str = "", create: str = "CREATE VIEW") -> str:
    """The views' DDL with the parts a later revision replaces as parameters (0004 passes columns);
    `worker_columns` are appended to worker_health's (0006), where CREATE OR REPLACE VIEW allows them."""
    latency = "\n    UNION ALL".join(_latency_branch(s, label, secs) for label, secs in _LATENCY_WINDOWS)
    return f"""
CREATE VIEW "{s}".queue_depth AS
WITH live AS (
    SELECT t.type, t.priority, 'queued'::text AS status, t.run_at
    FROM "{s}".tasks t WHERE t.status = 'queued'
    UNION ALL
    SELECT t.type, t.priority, 'running', NULL FROM "{s}".tasks t
    WHERE t.status = 'running' AND t.lease_expires_at IS NOT NULL
    UNION ALL
    SELECT t.type, t.priority, 'waiting', NULL FROM "{s}".tasks t WHERE t.status = 'waiting'
    UNION ALL
    SELECT t.type, t.priority, t.status, NULL FROM "{s}".tasks t
    WHERE t.finished_at >= now() - interval '1 hour' AND t.status IN ('done', 'failed', 'cancelled')
)
SELECT l.type,
       l.priority,
       count(*) FILTER (WHERE l.status = 'queued') AS queued,
       count(*) FILTER (WHERE l.status = 'queued' AND l.run_at <= now()) AS runnable,
       count(*) FILTER (WHERE l.status = 'queued' AND l.run_at > now()) AS scheduled,
       count(*) FILTER (WHERE l.status = 'waiting') AS waiting,
       count(*) FILTER (WHERE l.status = 'running') AS running,
       count(*) FILTER (WHERE l.status = 'done') AS done_last_hour,
       count(*) FILTER (WHERE l.status = 'failed') AS failed_last_hour,
       count(*) FILTER (WHERE l.status = 'cancelled') AS cancelled_last_hour,
       COALESCE(extract(epoch FROM now() - min(l.run_at) FILTER (WHERE l.run_at <= now())), 0)
           ::double precision
           AS oldest_wait_seconds,
       min(l.run_at) FILTER (WHERE l.run_at > now()) AS next_run_at,
       COALESCE(bool_or(q.paused), false) AS paused
FROM live l
LEFT JOIN "{s}".queues q ON q.type = l.type
GROUP BY l.type, l.priority;

CREATE VIEW "{s}".throughput AS
WITH bounds AS (
    SELECT date_trunc('minute', now()) - interval '59 minutes' AS since
), events AS (
    SELECT t.type, date_trunc('minute', t.finished_at) AS minute, t.status AS outcome
    FROM "{s}".tasks t
    WHERE t.finished_at >= date_trunc('minute', now()) - interval '59 minutes'
      AND t.status IN ('done', 'failed', 'cancelled')
    UNION ALL
    SELECT t.type, date_trunc('minute', {retry_at}), 'retried'
    FROM "{s}".tasks t
    WHERE t.status = 'queued' AND t.retry_count > 0 AND t.last_error IS NOT NULL
    UNION ALL
    SELECT t.type, date_trunc('minute', t.started_at), 'retried'
    FROM "{s}".tasks t
    WHERE t.status = 'running' AND t.lease_expires_at IS NOT NULL
      AND t.retry_count > 0 AND t.last_error IS NOT NULL
), recent AS (
    SELECT e.* FROM events e, bounds b WHERE e.minute >= b.since
), minutes AS (
    SELECT generate_series(b.since, date_trunc('minute', now()), interval '1 minute') AS minute FROM bounds b
)
SELECT ty.type,
       m.minute,
       count(*) FILTER (WHERE r.outcome = 'done') AS done,
       count(*) FILTER (WHERE r.outcome = 'failed') AS failed,
       count(*) FILTER (WHERE r.outcome = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE r.outcome = 'retried') AS retried
FROM (SELECT DISTINCT type FROM recent) ty
CROSS JOIN minutes m
LEFT JOIN recent r ON r.type = ty.type AND r.minute = m.minute
GROUP BY ty.type, m.minute;

CREATE VIEW "{s}".latency AS{latency};

CREATE VIEW "{s}".worker_health AS
SELECT w.id AS worker_id,
       w.host,
       w.pid,
       w.types,
       w.concurrency,
       w.version,
       w.started_at,
       w.last_seen AS last_heartbeat,
       extract(epoch FROM now() - w.last_seen)::double precision AS heartbeat_age_seconds,
       CASE WHEN w.stopped_at IS NOT NULL THEN 'stopped'
            WHEN w.last_seen < now() - {stale_after} THEN 'stale'
            ELSE 'alive' END AS state,
       w.stopped_at,
       COALESCE(r.running, 0) AS running,
       w.done,
       w.failed,
       COALESCE(r.lease_expired, 0) AS lease_expired{worker_columns}
FROM "{s}".workers w
LEFT JOIN (
    SELECT t.worker_id, count(*) AS running,
           count(*) FILTER (WHERE t.lease_expires_at < now()) AS lease_expired
    FROM "{s}".tasks t
    WHERE t.status = 'running' AND t.lease_expires_at IS NOT NULL
    GROUP BY t.worker_id
) r ON r.worker_id = w.id;

CREATE VIEW "{s}".failures AS
WITH recent AS (
    SELECT t.id, t.type, t.status, t.last_error, t.finished_at AS at
    FROM "{s}".tasks t
    WHERE t.finished_at >= now() - interval '24 hours' AND t.last_error IS NOT NULL
      AND t.status IN ('done', 'failed', 'cancelled')
    UNION ALL
    SELECT t.id, t.type, t.status, t.last_error, {retry_at}
    FROM "{s}".tasks t
    WHERE t.status = 'queued' AND t.retry_count > 0 AND t.last_error IS NOT NULL
    UNION ALL
    SELECT t.id, t.type, t.status, t.last_error, t.started_at
    FROM "{s}".tasks t
    WHERE t.status = 'running' AND t.lease_expires_at IS NOT NULL AND t.last_error IS NOT NULL
), keyed AS (
    SELECT r.*, {error_key} AS error
    FROM recent r
    WHERE r.at >= now() - interval '24 hours'
)
SELECT k.type,
       k.error,
       count(*) FILTER (WHERE k.status = 'failed') AS failed,
       count(*) FILTER (WHERE k.status <> 'failed') AS retried,
       count(*) AS tasks,
       min(k.at) AS first_seen,
       max(k.at) AS last_seen,
       (array_agg(k.id ORDER BY k.at DESC, k.id DESC))[1] AS latest_task_id,
       (array_agg(k.last_error ORDER BY k.at DESC, k.id DESC))[1] AS latest_message
FROM keyed k
GROUP BY k.type, k.error;
""".replace("CREATE VIEW", create)


def upgrade() -> None:
    op.execute(views_sql(migration_schema()))


def downgrade() -> None:
    s = migration_schema()
    op.execute(f"""
DROP VIEW IF EXISTS "{s}".failures;
DROP VIEW IF EXISTS "{s}".worker_health;
DROP VIEW IF EXISTS "{s}".latency;
DROP VIEW IF EXISTS "{s}".throughput;
DROP VIEW IF EXISTS "{s}".queue_depth;
""")
