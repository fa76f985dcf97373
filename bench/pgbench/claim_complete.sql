-- One worker cycle, two commits: claim up to 100 jobs, then complete them in one UPDATE.
-- Needs -M prepared (or extended) so :ids is sent as a bind parameter.
WITH c AS (
    SELECT id FROM t
    WHERE status = 'queued'
    ORDER BY priority DESC, id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE t SET status = 'running', locked_at = now()
    FROM c WHERE t.id = c.id
    RETURNING t.id
)
SELECT coalesce(array_agg(id), '{}') AS ids FROM claimed \gset
UPDATE t SET status = 'done' WHERE id = ANY (:ids::bigint[]);
