-- What `jobq roles` runs (jobqueue/admin/roles.py).
--
-- Roles and grants name identifiers, which PostgreSQL does not take as parameters. So each statement
-- here *returns* the statement(s) to run, built by format() with %I (identifiers, quoted when needed)
-- and %L (literals) from parameters: any schema or role name works, nothing is pasted by Python.
-- Privilege keywords are not identifiers: they come from `role_grants` below and reach the GRANTs
-- only through the CASE whitelists ($n::text must be one of the listed words).
-- `{schema}` is not used: the schema is a parameter like the role.

-- name: role_grants
-- What each role may do besides the dashboard's SELECT on everything: the policy docs/roles.md
-- explains, one row per grant, in the order `jobq roles` issues them. `object`: tables (the
-- privileges on the relations in `names` that exist), columns (one privilege on the columns of the
-- table `names[1]`, `only` those when not NULL, never those in `never`) or functions (EXECUTE on
-- every overload of the names). Every role also gets USAGE on the schema's sequences.
SELECT kind, object, privileges, names, never, only_columns
FROM (VALUES
    -- Reads tasks and documents; its own chunks through the own_chunks view (none on chunks itself).
    -- The observation views that only count tasks (queue_depth, throughput, latency, failures) tell it
    -- nothing tasks does not: a producer's web console shows its overview and failures. worker_health
    -- reads workers (the fleet's hosts and pids), which stays the dashboard's and the operator's.
    -- Every role reads alembic_version: the CLI checks the schema's revision before it acts.
    (1, 'producer', 'tables', ARRAY['SELECT'],
        ARRAY['tasks', 'documents', 'queues', 'queue_state', 'document_progress', 'batch_progress',
              'document_tasks', 'own_chunks', 'alembic_version', 'flow_control', 'schedules', 'schedules_due',
              'queue_depth', 'throughput', 'latency', 'failures'],
        NULL::text[], NULL::text[]),
    (2, 'producer', 'tables', ARRAY['SELECT', 'INSERT', 'UPDATE'], ARRAY['batches'], NULL, NULL),
    -- Enqueue (INSERT and COPY) writes the enqueue columns; the insert guard of 0005 keeps the status to
    -- waiting, queued or cancelled. `id` is there for enqueue_many's preallocated ids. What only the
    -- runtime writes, who enqueued a row, and a cron `schedule`/`tick` (a forged pair would take a
    -- tick's place) are never the producer's.
    (3, 'producer', 'columns', ARRAY['INSERT'], ARRAY['tasks'],
        ARRAY['worker_id', 'attempt', 'lease_expires_at', 'started_at', 'result', 'last_error', 'retry_count',
              'process_duration', 'cancel_requested_at', 'has_dependents', 'enqueued_by', 'created_at',
              'schedule', 'tick'], NULL),
    -- Enqueue with depends_on marks the parents (never unmarks them: a trigger of 0005).
    (4, 'producer', 'columns', ARRAY['UPDATE'], ARRAY['tasks'], ARRAY[]::text[], ARRAY['has_dependents']),
    (5, 'producer', 'columns', ARRAY['INSERT'], ARRAY['documents'], ARRAY['id', 'enqueued_by', 'created_at'], NULL),
    (6, 'producer', 'columns', ARRAY['UPDATE'], ARRAY['documents'], ARRAY['id', 'enqueued_by', 'created_at'], NULL),
    -- The producer's only other ways to change tasks (each checks the caller's ownership), by id and by
    -- selector (0008).
    (7, 'producer', 'functions', NULL,
        ARRAY['cancel_tasks', 'retry_tasks', 'reuse_task', 'replace_document_run', 'cancel_where', 'retry_where',
              'prioritize_tasks'], NULL, NULL),
    -- Claim, heartbeat, progress, complete, rescue (select/update tasks, upsert workers). DELETE on tasks
    -- and workers is the retention pass the workers run. Document handlers read documents and write
    -- chunks (raptor replaces its summary levels).
    (8, 'worker', 'tables', ARRAY['SELECT', 'UPDATE', 'DELETE'], ARRAY['tasks'], NULL, NULL),
    (9, 'worker', 'tables', ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'], ARRAY['workers', 'chunks'], NULL, NULL),
    (10, 'worker', 'tables', ARRAY['SELECT'], ARRAY['queues', 'documents', 'batches', 'alembic_version'], NULL, NULL),
    -- Flow control (0009): the rate windows the claim reads, appends to and prunes.
    (11, 'worker', 'tables', ARRAY['SELECT', 'INSERT', 'DELETE'], ARRAY['flow_grants'], NULL, NULL),
    (12, 'worker', 'tables', ARRAY['SELECT'], ARRAY['flow_rules', 'flow_control'], NULL, NULL),
    -- Cron: the worker declares its types' schedules and moves them on; it enqueues their ticks only
    -- through fire_ticks (0010), never by INSERT on tasks.
    (13, 'worker', 'tables', ARRAY['SELECT', 'INSERT', 'UPDATE'], ARRAY['schedules'], NULL, NULL),
    -- Its types' flow declarations and their key index (0009), cron ticks (0010).
    (14, 'worker', 'functions', NULL, ARRAY['declare_flow', 'fire_ticks'], NULL, NULL)
) AS g(n, kind, object, privileges, names, never, only_columns)
WHERE kind = $1
ORDER BY n;

-- name: create_role
-- Concurrent runs (two databases on one cluster) race on the shared catalog: either error means
-- the role exists now.
SELECT format('DO $do$ BEGIN CREATE ROLE %I NOLOGIN; '
              'EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $do$', $1::text);

-- name: reset_role
-- Take back everything the role holds in the schema, then let it see the schema.
SELECT format(s, $1::text, $2::text)
FROM unnest(ARRAY['REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I',
                  'REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM %I',
                  'REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %I FROM %I',
                  'REVOKE ALL ON SCHEMA %I FROM %I',
                  'GRANT USAGE ON SCHEMA %I TO %I']) WITH ORDINALITY AS u(s, n)
ORDER BY n;

-- name: grant_all_tables
-- $3: SELECT or USAGE (sequences).
SELECT format('GRANT %s ON ALL %s IN SCHEMA %I TO %I',
              CASE $3::text WHEN 'SELECT' THEN 'SELECT' WHEN 'USAGE' THEN 'USAGE' END,
              CASE $3::text WHEN 'SELECT' THEN 'TABLES' WHEN 'USAGE' THEN 'SEQUENCES' END, $1::text, $2::text);

-- name: grant_tables
-- $3 on the relations $4 that exist in the schema (none: no statement).
SELECT format('GRANT %s ON %s TO %I', string_agg(p.word, ', ' ORDER BY p.n),
              (SELECT string_agg(format('%I.%I', $1::text, r), ', ' ORDER BY r)
               FROM unnest($4::text[]) AS r WHERE to_regclass(format('%I.%I', $1::text, r)) IS NOT NULL),
              $2::text)
FROM unnest($3::text[]) WITH ORDINALITY AS u(word, n)
CROSS JOIN LATERAL (SELECT CASE u.word WHEN 'SELECT' THEN 'SELECT' WHEN 'INSERT' THEN 'INSERT'
                               WHEN 'UPDATE' THEN 'UPDATE' WHEN 'DELETE' THEN 'DELETE' END AS word, u.n) p
HAVING EXISTS (SELECT 1 FROM unnest($4::text[]) AS r WHERE to_regclass(format('%I.%I', $1::text, r)) IS NOT NULL);

-- name: grant_columns
-- $3 (INSERT or UPDATE) on the columns of table $4 named in $6 (NULL: every column) except those in
-- $5. A column a later revision adds is covered by the next run; the excluded ones (who enqueued a
-- row, what only a worker writes) never are.
SELECT format('GRANT %s (%s) ON %I.%I TO %I',
              CASE $3::text WHEN 'INSERT' THEN 'INSERT' WHEN 'UPDATE' THEN 'UPDATE' END,
              string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum), $1::text, $4::text, $2::text)
FROM pg_attribute a
WHERE a.attrelid = to_regclass(format('%I.%I', $1::text, $4::text)) AND a.attnum > 0 AND NOT a.attisdropped
  AND NOT a.attname = ANY ($5::text[]) AND ($6::text[] IS NULL OR a.attname = ANY ($6::text[]))
HAVING count(*) > 0;

-- name: grant_functions
-- EXECUTE on the functions named $3 that exist in the schema (every overload).
SELECT format('GRANT EXECUTE ON FUNCTION %I.%I(%s) TO %I', n.nspname, p.proname,
              pg_get_function_identity_arguments(p.oid), $2::text)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = $1 AND p.proname = ANY ($3::text[])
ORDER BY p.proname, p.oid;

-- name: read_only
SELECT format('ALTER ROLE %I SET default_transaction_read_only = on', $1::text);

-- name: login_password
-- $2 is the SCRAM-SHA-256 verifier, never the password.
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', $1::text, $2::text);
