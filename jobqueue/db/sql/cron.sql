-- Cron schedules (migration 0010): the scheduler's due scan and firing
-- (jobqueue/runtime/maintenance/scheduler.py), and the run-time changes of `jobq cron` (jobqueue/cron.py).
--
-- Conventions:
--   * `{schema}` is the schema, filled in by the loader (jobqueue/db/sqlfile.py).
--   * Parameters are PostgreSQL's own $1, $2 ... (asyncpg, and psycopg's RawCursor).
--   * A schedule's next_tick is computed in Python (croniter): PostgreSQL has no cron parser. It is
--     the first tick not yet fired; last_tick the latest one fired.

-- name: db_now
SELECT now() AS now;

-- name: list_schedules
SELECT name, type, cron, tz, paused, source, backfill, last_tick, next_tick, next_in_seconds,
       last_task_id, last_task_status
FROM {schema}.schedules_due ORDER BY name;

-- name: get_schedule
SELECT cron, tz, now() AS now FROM {schema}.schedules WHERE name = $1;

-- name: add_schedule
-- A schedule added at run time ($10: replace one of the same name, keeping its last tick and pause).
INSERT INTO {schema}.schedules AS s (name, type, cron, tz, payload, priority, max_retries, backfill, next_tick,
                                     source)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, 'table')
ON CONFLICT (name) DO UPDATE
SET type = EXCLUDED.type, cron = EXCLUDED.cron, tz = EXCLUDED.tz, payload = EXCLUDED.payload,
    priority = EXCLUDED.priority, max_retries = EXCLUDED.max_retries, backfill = EXCLUDED.backfill,
    next_tick = EXCLUDED.next_tick, source = 'table', updated_at = now()
WHERE $10::boolean
RETURNING s.name;

-- name: pause_schedule
-- Pause ($2 true) or resume ($2 false, from the next tick on: $3).
UPDATE {schema}.schedules
SET paused = $2, next_tick = COALESCE($3::timestamptz, next_tick), updated_at = now()
WHERE name = $1
RETURNING name;

-- name: remove_schedule
DELETE FROM {schema}.schedules WHERE name = $1 RETURNING name;

-- name: declare_schedules
-- The schedules declared in code (@task(cron=...)) by a starting worker, in name order (workers
-- starting together lock the rows in the same order). A changed expression or time zone starts from
-- its next tick ($8); otherwise the schedule keeps its place, and always its pause.
INSERT INTO {schema}.schedules AS s (name, type, cron, tz, priority, max_retries, backfill, next_tick, source)
SELECT d.name, d.name, d.cron, d.tz, d.priority, d.max_retries, d.backfill, d.next_tick, 'code'
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::int[], $6::int[], $7::timestamptz[])
    AS d(name, cron, tz, priority, max_retries, backfill, next_tick)
ORDER BY d.name
ON CONFLICT (name) DO UPDATE
SET type = EXCLUDED.type, cron = EXCLUDED.cron, tz = EXCLUDED.tz, priority = EXCLUDED.priority,
    max_retries = EXCLUDED.max_retries, backfill = EXCLUDED.backfill, source = 'code', updated_at = now(),
    next_tick = CASE WHEN (s.cron, s.tz) IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.tz) THEN EXCLUDED.next_tick
                     ELSE s.next_tick END
WHERE (s.type, s.cron, s.tz, s.priority, s.max_retries, s.backfill, s.source)
      IS DISTINCT FROM (EXCLUDED.type, EXCLUDED.cron, EXCLUDED.tz, EXCLUDED.priority, EXCLUDED.max_retries,
                        EXCLUDED.backfill, 'code');

-- name: due_schedules
-- Schedules whose next tick is due by $1 (NULL: the database's clock) plus the lookahead $2 seconds,
-- locked (a scheduler holding one is skipped, never waited for), at most $3. Also the clock used.
SELECT s.name, s.cron, s.tz, s.backfill, s.next_tick, COALESCE($1::timestamptz, now()) AS now
FROM {schema}.schedules s
WHERE NOT s.paused AND s.next_tick <= COALESCE($1::timestamptz, now()) + make_interval(secs => $2)
ORDER BY s.name
LIMIT $3
FOR NO KEY UPDATE OF s SKIP LOCKED;

-- name: fire_ticks
-- One task per (schedule, tick) of $1/$2, run_at the tick, and each schedule of $3 moved on (its
-- latest tick fired $4, its next $5); $6 is the retries of a schedule that names none. The function
-- (migration 0010) is how a worker, which may not INSERT tasks, enqueues exactly what a schedule says.
SELECT id, schedule, tick FROM {schema}.fire_ticks($1::text[], $2::timestamptz[], $3::text[], $4::timestamptz[],
                                                   $5::timestamptz[], $6::int);
