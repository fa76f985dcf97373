-- What jobqueue/observe/ reads: the observation views of migration 0003, never the tasks table, so the
-- terminal, Grafana and the exporter agree and share the views' cheap plans. Run together inside one
-- REPEATABLE READ, READ ONLY transaction (observe/snapshot.py) so the panels agree with each other.

-- name: snapshot_begin
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- name: now
SELECT now() AS now;

-- name: queue_depth
SELECT * FROM {schema}.queue_depth ORDER BY type, priority DESC;

-- name: queue_state
-- Pause, cap and live workers per type (view of migration 0008), also for queues with no task.
SELECT type, paused, max_running, workers FROM {schema}.queue_state ORDER BY type;

-- name: throughput
SELECT * FROM {schema}.throughput ORDER BY type, minute;

-- name: latency
SELECT * FROM {schema}.latency ORDER BY type, period_seconds;

-- name: workers
-- Stopped workers stay visible for $1 seconds, so a crash or a rolling restart remains in view.
SELECT * FROM {schema}.worker_health
WHERE stopped_at IS NULL OR stopped_at > now() - make_interval(secs => $1)
ORDER BY state, worker_id;

-- name: failures
SELECT type, error, failed, retried, tasks, first_seen, last_seen, latest_task_id, latest_message
FROM {schema}.failures ORDER BY last_seen DESC LIMIT $1;

-- name: flow_control
-- Flow-controlled keys (migration 0009), the held-back and the busiest first, at most $1 of them.
SELECT type, key, fair, queued, running, max_per_key, rate_n, rate_secs, rate_by_key, rate_used, held_by,
       held_back, wait_seconds
FROM {schema}.flow_control
ORDER BY held_back DESC, running DESC, queued DESC, type, key
LIMIT $1;

-- name: schedules
-- Cron schedules (migration 0010's schedules_due), the next to fire first; at most $1.
SELECT name, type, cron, tz, paused, next_tick, next_in_seconds, last_task_id, last_task_status
FROM {schema}.schedules_due ORDER BY paused, next_tick, name LIMIT $1;
