"""Queue and bulk control (issue 14): selectors for cancel, retry and priority; queues seen whole.

- ``matching_tasks``: the ids of the tasks a selector (ids, type, owner, batch, label, document,
  status) matches, among the statuses an action allows. A caller that is not trusted (docs/roles.md)
  matches only the tasks its role enqueued, so a producer's selector never reaches another role's
  work. A selector without any filter is refused: nothing cancels everything by accident.
- ``cancel_where`` and ``retry_where`` hand those ids to 0005's ``cancel_tasks`` and ``retry_tasks``
  (one statement for the caller, the same locking, NOTIFY and ownership rules as single cancels);
  ``prioritize_tasks`` sets the priority of queued and waiting tasks, rows locked in id order.
- ``queue_depth`` gains ``max_running`` and ``served`` (a live worker serves the type), appended at the
  end so the grants roles hold on it survive; the new view ``queue_state`` has one row per type known
  anywhere (the queues table, live tasks, live workers): paused, cap, counts and the workers serving it.

Pausing and capping are plain writes to the ``queues`` table: the schema owner (or a superuser) may,
the jobq_* roles may not (docs/roles.md says why).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from types import ModuleType

from alembic import op

from jobqueue.states import migration_schema, sibling_revision

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

DEFINER_FUNCTIONS = (
    "cancel_where(text, text, bigint, text, bigint, text[], text, integer, text)",
    "retry_where(text, text, bigint, text, bigint, text[], text, integer)",
    "prioritize_tasks(bigint[], text, text, bigint, text, bigint, text[], integer)",
)
_MATCHING = "matching_tasks(bigint[], text, text, bigint, text, bigint, text[], text[])"

_PAUSED = "COALESCE(bool_or(q.paused), false) AS paused"


def _runtime() -> ModuleType:
    """0004, whose views (re-issued by 0006) hold queue_depth, and whose worker staleness rule we share."""
    return sibling_revision("0004_runtime.py")


def _alive(w: str = "w") -> str:
    """A worker row that is neither stopped nor stale, as worker_health's state 'alive' says."""
    return f"{w}.stopped_at IS NULL AND {w}.last_seen >= now() - {_runtime()._STALE_AFTER}"


def queue_depth_sql(s: str, extra: str = "") -> str:
    """queue_depth as 0004 defines it, with `extra` appended to its columns (one copy of the view)."""
    ddl = _runtime().views_sql(s)
    start = ddl.index(f'CREATE OR REPLACE VIEW "{s}".queue_depth')
    end = ddl.index("CREATE OR REPLACE VIEW", start + 1)
    view = ddl[start:end]
    assert _PAUSED in view
    return view.replace(_PAUSED, _PAUSED + extra)


def upgrade() -> None:
    s = migration_schema()
    definer = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
    served = f""",
       max(q.max_running) AS max_running,
       EXISTS (SELECT 1 FROM "{s}".workers w WHERE l.type = ANY (w.types) AND {_alive()}) AS served"""
    op.execute(queue_depth_sql(s, served))
    op.execute(f"""
CREATE VIEW "{s}".queue_state AS
WITH counts AS (
    SELECT t.type, count(*) AS queued, count(*) FILTER (WHERE t.run_at <= now()) AS runnable,
           0::bigint AS waiting, 0::bigint AS running
    FROM "{s}".tasks t WHERE t.status = 'queued' GROUP BY t.type
    UNION ALL
    SELECT t.type, 0, 0, count(*), 0 FROM "{s}".tasks t WHERE t.status = 'waiting' GROUP BY t.type
    UNION ALL
    SELECT t.type, 0, 0, 0, count(*) FROM "{s}".tasks t
    WHERE t.status = 'running' AND t.lease_expires_at IS NOT NULL GROUP BY t.type
), alive AS (
    SELECT unnest(w.types) AS type FROM "{s}".workers w WHERE {_alive()}
), types AS (
    SELECT c.type FROM counts c UNION SELECT q.type FROM "{s}".queues q UNION SELECT a.type FROM alive a
)
SELECT ty.type,
       COALESCE(q.paused, false) AS paused,
       q.max_running,
       COALESCE((SELECT sum(c.queued) FROM counts c WHERE c.type = ty.type), 0)::bigint AS queued,
       COALESCE((SELECT sum(c.runnable) FROM counts c WHERE c.type = ty.type), 0)::bigint AS runnable,
       COALESCE((SELECT sum(c.waiting) FROM counts c WHERE c.type = ty.type), 0)::bigint AS waiting,
       COALESCE((SELECT sum(c.running) FROM counts c WHERE c.type = ty.type), 0)::bigint AS running,
       (SELECT count(*) FROM alive a WHERE a.type = ty.type) AS workers,
       q.updated_at
FROM types ty
LEFT JOIN "{s}".queues q ON q.type = ty.type;

-- The tasks a selector matches among the statuses an action allows ($8): a NULL filter is off, and
-- at least one must be on. Callers that are not trusted match only the tasks their role enqueued.
CREATE FUNCTION "{s}".matching_tasks(p_ids bigint[], p_type text, p_owner text, p_batch bigint, p_label text,
                                    p_doc bigint, p_status text[], p_allowed text[])
RETURNS bigint[] LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_caller text := "{s}".caller();
    v_trusted boolean := "{s}".trusted("{s}".caller());
    v_ids bigint[];
BEGIN
    IF num_nonnulls(p_ids, p_type, p_owner, p_batch, p_label, p_doc, p_status) = 0 THEN
        RAISE EXCEPTION 'no selector: name task ids, a type, owner, batch, label, document or status'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT p_status <@ p_allowed THEN
        RAISE EXCEPTION 'status must be among %', array_to_string(p_allowed, ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(t.id ORDER BY t.id) INTO v_ids FROM "{s}".tasks t
    WHERE t.status = ANY (COALESCE(p_status, p_allowed))
      AND (p_ids IS NULL OR t.id = ANY (p_ids))
      AND (p_type IS NULL OR t.type = p_type)
      AND (p_owner IS NULL OR t.owner = p_owner)
      AND (p_batch IS NULL OR t.batch_id = p_batch)
      AND (p_label IS NULL OR t.labels @> ARRAY[p_label])
      AND (p_doc IS NULL OR t.doc_id = p_doc)
      AND (v_trusted OR t.enqueued_by = v_caller);
    RETURN COALESCE(v_ids, '{{}}');
END
$$;

-- Cancel by selector: the matched live tasks go through cancel_tasks (queued and waiting ones at
-- once, running ones through their worker's NOTIFY, then their waiting descendants).
CREATE FUNCTION "{s}".cancel_where(p_type text, p_owner text, p_batch bigint, p_label text, p_doc bigint,
                                  p_status text[], p_line text, p_max_chars integer, p_dep_line text)
RETURNS TABLE (id bigint, status text, dependents_cancelled bigint)
LANGUAGE sql {definer} AS $$
    SELECT c.id, c.status, c.dependents_cancelled
    FROM "{s}".cancel_tasks("{s}".matching_tasks(NULL, p_type, p_owner, p_batch, p_label, p_doc, p_status,
                                                 ARRAY['waiting', 'queued', 'running']),
                            NULL, p_line, p_max_chars, p_dep_line) c
$$;

-- Retry by selector: the matched failed or cancelled tasks go through retry_tasks.
CREATE FUNCTION "{s}".retry_where(p_type text, p_owner text, p_batch bigint, p_label text, p_doc bigint,
                                 p_status text[], p_line text, p_max_chars integer)
RETURNS TABLE (id bigint, status text)
LANGUAGE sql {definer} AS $$
    SELECT r.id, r.status
    FROM "{s}".retry_tasks("{s}".matching_tasks(NULL, p_type, p_owner, p_batch, p_label, p_doc, p_status,
                                                ARRAY['failed', 'cancelled']),
                           NULL, p_line, p_max_chars) r
$$;

-- A new priority for queued and waiting tasks, by id or selector; the next claim orders by it.
CREATE FUNCTION "{s}".prioritize_tasks(p_ids bigint[], p_type text, p_owner text, p_batch bigint, p_label text,
                                      p_doc bigint, p_status text[], p_priority integer)
RETURNS TABLE (id bigint, priority integer)
LANGUAGE sql {definer} AS $$
    WITH locked AS (
        SELECT k.id
        FROM unnest("{s}".matching_tasks(p_ids, p_type, p_owner, p_batch, p_label, p_doc, p_status,
                                         ARRAY['waiting', 'queued'])) AS m(id)
        JOIN "{s}".tasks k ON k.id = m.id
        ORDER BY k.id FOR UPDATE OF k
    )
    UPDATE "{s}".tasks t SET priority = p_priority
    FROM locked
    WHERE t.id = locked.id AND t.status IN ('waiting', 'queued')
    RETURNING t.id, t.priority
$$;
""")
    for signature in (*DEFINER_FUNCTIONS, _MATCHING):
        op.execute(f'REVOKE EXECUTE ON FUNCTION "{s}".{signature} FROM PUBLIC')


def downgrade() -> None:
    s = migration_schema()
    op.execute(f"""
DROP FUNCTION IF EXISTS "{s}".prioritize_tasks(bigint[], text, text, bigint, text, bigint, text[], integer);
DROP FUNCTION IF EXISTS "{s}".retry_where(text, text, bigint, text, bigint, text[], text, integer);
DROP FUNCTION IF EXISTS "{s}".cancel_where(text, text, bigint, text, bigint, text[], text, integer, text);
DROP FUNCTION IF EXISTS "{s}".{_MATCHING};
DROP VIEW IF EXISTS "{s}".queue_state;
""")
    # queue_depth cannot lose its columns in place: dropped and created again with its grants.
    op.execute(sibling_revision("0006_abandoned_threads.py").recreate_view(s, "queue_depth", queue_depth_sql(s)))
