-- What waiters run (jobqueue/client/wait.py): Client.wait, Client.events and the LISTEN probe.
-- `{schema}` is filled in by the loader; parameters are PostgreSQL's $1, $2 ...

-- name: watch
-- The watched tasks as events see them: by id ($1) and/or of a document ($2), with the newest
-- progress line and, when $3, the result of the done ones (as JSON text: both drivers read it alike).
SELECT id, doc_id, type, status, progress, split_part(rtrim(progress_msg, E'\n'), E'\n', -1) AS message,
       last_error, CASE WHEN $3::bool AND status = 'done' THEN result::text END AS result
FROM {schema}.tasks
WHERE id = ANY($1::bigint[]) OR doc_id = $2::bigint
ORDER BY id;

-- name: probe
-- A notification the listener must hear ($1 channel, $2 payload): behind PgBouncer in transaction
-- mode LISTEN succeeds but hears nothing, and waiters then poll.
SELECT pg_notify($1, $2);
