"""Roles that only allow what they say: producers write through functions that check ownership.

A producer (any role without UPDATE on the tasks table as a whole, e.g. jobq_producer) enqueues with
plain INSERT/COPY on the enqueue columns only, and cancels, retries and re-enqueues documents only
through the SECURITY DEFINER functions below, which act on the caller's own rows. "Own" is decided
by the database, not by the caller: each task and document records the role that enqueued it
(``enqueued_by``, defaulting to ``current_user``, a column producers cannot write). The ``owner``
column stays an application label the producer chooses freely; the database cannot check it.

Roles that may UPDATE the tasks table directly (the schema owner, superusers, jobq_worker) are
"trusted": the functions do not restrict them, as they could make the same change by hand.
Rows written before this revision have no ``enqueued_by``: only trusted roles act on them.

Also here, written once: the recursive "cancel the waiting descendants" statement (used by
``cancel_tasks`` and by the runtime's ``cancel_dependents``) and ``retry_tasks``, which recomputes
``pending_deps`` from the parents so a retried task waits for unfinished parents.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from alembic import op

from jobqueue.states import migration_schema

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Functions a producer reaches only through `jobq roles` (EXECUTE is revoked from PUBLIC).
DEFINER_FUNCTIONS = (
    "cancel_tasks(bigint[], bigint, text, integer, text)",
    "retry_tasks(bigint[], bigint, text, integer)",
    "reuse_task(bigint, bigint, integer, text, text)",
)


def cancel_dependents_sql(s: str, create: str = "CREATE FUNCTION") -> str:
    """The cancel_dependents function as this revision defines it (0010's downgrade restores it)."""
    return f"""-- The waiting descendants of parents that failed or were cancelled are cancelled, with a reason
-- line; rows locked in id order. Invoker's rights: only roles that may update tasks can run it.
{create} "{s}".cancel_dependents(p_parents bigint[], p_line text, p_max_chars integer)
RETURNS TABLE (id bigint, doc_id bigint, progress real) LANGUAGE sql AS $$
    WITH RECURSIVE doomed AS (
        SELECT c.id FROM "{s}".tasks c WHERE c.depends_on && p_parents AND c.status = 'waiting'
        UNION
        SELECT c.id FROM "{s}".tasks c JOIN doomed d ON c.depends_on @> ARRAY[d.id] WHERE c.status = 'waiting'
    ), locked AS (
        SELECT k.id FROM "{s}".tasks k WHERE k.id IN (SELECT doomed.id FROM doomed) ORDER BY k.id FOR UPDATE
    )
    UPDATE "{s}".tasks t
    SET status = 'cancelled', finished_at = now(),
        progress_msg = "{s}".append_log(t.progress_msg, p_line, p_max_chars)
    FROM locked
    WHERE t.id = locked.id AND t.status = 'waiting'
    RETURNING t.id, t.doc_id, t.progress
$$;
"""


def upgrade() -> None:
    s = migration_schema()
    definer = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
    op.execute(f"""
-- Who enqueued a row. Added without a default first, so existing rows stay NULL (no rewrite).
ALTER TABLE "{s}".tasks ADD COLUMN enqueued_by text;
ALTER TABLE "{s}".tasks ALTER COLUMN enqueued_by SET DEFAULT current_user;
ALTER TABLE "{s}".documents ADD COLUMN enqueued_by text;
ALTER TABLE "{s}".documents ALTER COLUMN enqueued_by SET DEFAULT current_user;

-- The role the caller acts as. Inside a SECURITY DEFINER function current_user is the function's
-- owner; the `role` setting still holds what SET ROLE chose (only a member can set it), and
-- session_user is the login when no role was set.
CREATE FUNCTION "{s}".caller() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT COALESCE(NULLIF(current_setting('role'), 'none'), session_user::text)
$$;

-- A role that may UPDATE every column of the tasks table could make any change by hand: the
-- ownership checks below do not apply to it (the owner, superusers, jobq_worker).
CREATE FUNCTION "{s}".trusted(p_role text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT has_table_privilege(p_role, '"{s}".tasks', 'UPDATE')
$$;

CREATE FUNCTION "{s}".may_act_for(p_enqueued_by text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT p_enqueued_by IS NOT DISTINCT FROM "{s}".caller() OR "{s}".trusted("{s}".caller())
$$;

-- Refuses the triggering change unless the role making it is trusted; TG_ARGV[0] says why.
CREATE FUNCTION "{s}".refuse_untrusted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT "{s}".trusted(current_user::text) THEN
        RAISE EXCEPTION '% (role %)', TG_ARGV[0], current_user USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

-- Producers insert tasks as enqueue makes them; a running or done row could only be forged. The
-- WHEN clause keeps the ordinary (queued) insert and COPY free of any function call.
CREATE TRIGGER tasks_insert_guard BEFORE INSERT ON "{s}".tasks FOR EACH ROW
    WHEN (NEW.status NOT IN ('waiting', 'queued', 'cancelled'))
    EXECUTE FUNCTION "{s}".refuse_untrusted(
        'only trusted roles insert tasks that are not waiting, queued or cancelled');
-- Producers may mark parents (enqueue with depends_on) but never unmark them: a parent that forgot
-- its dependents would never release them.
CREATE TRIGGER tasks_dependents_guard BEFORE UPDATE OF has_dependents ON "{s}".tasks FOR EACH ROW
    WHEN (OLD.has_dependents AND NOT NEW.has_dependents)
    EXECUTE FUNCTION "{s}".refuse_untrusted('has_dependents cannot be cleared');
-- A task of a document writes that document's chunks: a producer adds tasks only to its own
-- documents. To it another role's document is as good as missing, hence a foreign key error.
CREATE FUNCTION "{s}".refuse_foreign_document() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT "{s}".trusted(current_user::text) AND NOT EXISTS (
        SELECT 1 FROM "{s}".documents d WHERE d.id = NEW.doc_id AND d.enqueued_by = current_user
    ) THEN
        RAISE EXCEPTION 'doc_id % is not a document enqueued by role %', NEW.doc_id, current_user
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER tasks_document_guard BEFORE INSERT ON "{s}".tasks FOR EACH ROW
    WHEN (NEW.doc_id IS NOT NULL) EXECUTE FUNCTION "{s}".refuse_foreign_document();
-- A producer re-enqueueing a document updates its row; only the role that enqueued it may.
CREATE TRIGGER documents_owner_guard BEFORE UPDATE ON "{s}".documents FOR EACH ROW
    WHEN (OLD.enqueued_by IS DISTINCT FROM current_user)
    EXECUTE FUNCTION "{s}".refuse_untrusted('only the role that enqueued a document may change it');

-- The chunks of the documents the current role enqueued (producers have no grant on chunks).
CREATE VIEW "{s}".own_chunks WITH (security_barrier) AS
SELECT k.* FROM "{s}".chunks k JOIN "{s}".documents d ON d.id = k.doc_id
WHERE d.enqueued_by = current_user;

{cancel_dependents_sql(s)}
-- Cancel live tasks by id or by document: queued and waiting ones at once, running ones get
-- cancel_requested_at and a NOTIFY on {s}.cancel for the worker holding them; then their waiting
-- descendants. A caller that is not trusted may cancel only tasks it enqueued.
CREATE FUNCTION "{s}".cancel_tasks(p_ids bigint[], p_doc bigint, p_line text, p_max_chars integer,
                                  p_dep_line text)
RETURNS TABLE (id bigint, status text, dependents_cancelled bigint)
LANGUAGE plpgsql {definer} AS $$
#variable_conflict use_column
DECLARE
    v_caller text := "{s}".caller();
    v_other record;
    v_ids bigint[];
    v_status text[];
    v_parents bigint[];
    v_deps bigint := 0;
BEGIN
    SELECT t.id, t.enqueued_by INTO v_other FROM "{s}".tasks t
    WHERE (t.id = ANY (p_ids) OR t.doc_id = p_doc) AND t.status IN ('waiting', 'queued', 'running')
      AND t.enqueued_by IS DISTINCT FROM v_caller AND NOT "{s}".trusted(v_caller)
    ORDER BY t.id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'task % was enqueued by %; % may cancel only its own tasks', v_other.id,
            COALESCE(v_other.enqueued_by, 'an unknown role'), v_caller
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    WITH locked AS (
        SELECT t.id FROM "{s}".tasks t
        WHERE (t.id = ANY (p_ids) OR t.doc_id = p_doc) AND t.status IN ('waiting', 'queued', 'running')
        ORDER BY t.id FOR UPDATE
    ), c AS (
        UPDATE "{s}".tasks t
        SET status = CASE WHEN t.status = 'running' THEN 'running' ELSE 'cancelled' END,
            finished_at = CASE WHEN t.status = 'running' THEN NULL ELSE now() END,
            cancel_requested_at = COALESCE(t.cancel_requested_at, now()),
            progress_msg = "{s}".append_log(t.progress_msg, p_line, p_max_chars)
        FROM locked
        WHERE t.id = locked.id AND t.status IN ('waiting', 'queued', 'running')
        RETURNING t.id, t.status, t.attempt, t.has_dependents, t.doc_id, t.progress,
                  CASE WHEN t.status = 'running' THEN pg_notify('{s}.cancel', t.id || ':' || t.attempt)
                       ELSE pg_notify('{s}.progress', t.id || ',' || COALESCE(t.doc_id, 0) || ',' || t.progress)
                  END AS notified
    )
    SELECT array_agg(c.id ORDER BY c.id), array_agg(c.status ORDER BY c.id),
           array_agg(c.id) FILTER (WHERE c.status = 'cancelled' AND c.has_dependents)
    INTO v_ids, v_status, v_parents FROM c;
    IF v_parents IS NOT NULL THEN
        SELECT count(*) INTO v_deps FROM "{s}".cancel_dependents(v_parents, p_dep_line, p_max_chars);
    END IF;
    RETURN QUERY SELECT u.id, u.status, v_deps FROM unnest(v_ids, v_status) AS u(id, status);
END
$$;

-- A user's retry of failed or cancelled tasks (by id or by document): a new life (retry_count
-- reset). A task whose parents are not all done waits for them (pending_deps recomputed from the
-- parents as locked now, retried parents included), so retrying a document requeues its ranges and
-- leaves its follow-up task waiting for them. A dedupe key now held by a live task refuses the retry
-- (unique_violation, naming the live task). A caller that is not trusted retries only its own tasks.
CREATE FUNCTION "{s}".retry_tasks(p_ids bigint[], p_doc bigint, p_line text, p_max_chars integer)
RETURNS TABLE (id bigint, status text)
LANGUAGE plpgsql {definer} AS $$
#variable_conflict use_column
DECLARE
    v_caller text := "{s}".caller();
    v_row record;
    v_ids bigint[];
    v_status text[];
    v_types text[];
BEGIN
    SELECT t.id, t.enqueued_by INTO v_row FROM "{s}".tasks t
    WHERE (t.id = ANY (p_ids) OR t.doc_id = p_doc) AND t.status IN ('failed', 'cancelled')
      AND t.enqueued_by IS DISTINCT FROM v_caller AND NOT "{s}".trusted(v_caller)
    ORDER BY t.id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'task % was enqueued by %; % may retry only its own tasks', v_row.id,
            COALESCE(v_row.enqueued_by, 'an unknown role'), v_caller
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT t.id, t.dedupe_key, l.id AS live INTO v_row FROM "{s}".tasks t
    JOIN "{s}".tasks l ON l.dedupe_key = t.dedupe_key AND l.status IN ('waiting', 'queued', 'running')
    WHERE (t.id = ANY (p_ids) OR t.doc_id = p_doc) AND t.status IN ('failed', 'cancelled')
    ORDER BY t.id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'task % cannot be retried: its dedupe key % is held by live task %', v_row.id,
            quote_literal(v_row.dedupe_key), v_row.live USING ERRCODE = 'unique_violation';
    END IF;
    WITH targets AS (
        SELECT t.id, t.depends_on FROM "{s}".tasks t
        WHERE (t.id = ANY (p_ids) OR t.doc_id = p_doc) AND t.status IN ('failed', 'cancelled')
    ), locked AS (
        -- The tasks and their parents, in id order; a parent's status is read as locked (its latest
        -- version), so a parent finishing concurrently is either seen done or releases us afterwards.
        SELECT k.id, k.status FROM "{s}".tasks k
        WHERE k.id IN (SELECT g.id FROM targets g UNION SELECT unnest(g.depends_on) FROM targets g)
        ORDER BY k.id FOR NO KEY UPDATE
    ), plan AS (
        SELECT g.id, (SELECT count(*) FROM locked p WHERE p.id = ANY (g.depends_on) AND p.status <> 'done')
                     AS pending
        FROM targets g JOIN locked l ON l.id = g.id
        WHERE l.status IN ('failed', 'cancelled')
    ), r AS (
        UPDATE "{s}".tasks t
        SET status = CASE WHEN plan.pending > 0 THEN 'waiting' ELSE 'queued' END,
            pending_deps = plan.pending, retry_count = 0, run_at = now(), finished_at = NULL, progress = 0,
            result = NULL, cancel_requested_at = NULL, worker_id = NULL, lease_expires_at = NULL,
            progress_msg = "{s}".append_log(t.progress_msg, p_line, p_max_chars)
        FROM plan
        WHERE t.id = plan.id AND t.status IN ('failed', 'cancelled')
        RETURNING t.id, t.type, t.status
    )
    SELECT array_agg(r.id ORDER BY r.id), array_agg(r.status ORDER BY r.id),
           array_agg(DISTINCT r.type) FILTER (WHERE r.status = 'queued')
    INTO v_ids, v_status, v_types FROM r;
    PERFORM pg_notify('{s}.' || w.type, extract(epoch FROM now())::text) FROM unnest(v_types) AS w(type);
    RETURN QUERY SELECT u.id, u.status FROM unnest(v_ids, v_status) AS u(id, status);
END
$$;

-- Re-enqueueing a document whose range is unchanged: a new task recorded done at once with the
-- result and chunks of finished task p_old (of a document the caller enqueued). p_line is the new
-- task's log line; `{{moved}}` in it becomes the number of chunks taken over.
CREATE FUNCTION "{s}".reuse_task(p_old bigint, p_batch bigint, p_priority integer, p_owner text, p_line text)
RETURNS TABLE (id bigint, moved bigint)
LANGUAGE plpgsql {definer} AS $$
#variable_conflict use_column
DECLARE
    v_by text;
    v_new bigint;
    v_moved bigint;
BEGIN
    SELECT d.enqueued_by INTO v_by FROM "{s}".tasks t JOIN "{s}".documents d ON d.id = t.doc_id
    WHERE t.id = p_old AND t.status = 'done';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % is not a finished document task', p_old USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT "{s}".may_act_for(v_by) THEN
        RAISE EXCEPTION 'task % belongs to a document enqueued by %', p_old, COALESCE(v_by, 'an unknown role')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO "{s}".tasks AS n (type, priority, payload, status, progress, finished_at, process_duration, doc_id,
                           batch_id, from_page, to_page, owner, digest, result, max_retries, labels, enqueued_by)
    SELECT t.type, p_priority, t.payload, 'done', 1, now(), 0, t.doc_id, p_batch, t.from_page, t.to_page,
           p_owner, t.digest, t.result, t.max_retries, t.labels, "{s}".caller()
    FROM "{s}".tasks t WHERE t.id = p_old
    RETURNING n.id INTO v_new;
    UPDATE "{s}".chunks k SET task_id = v_new WHERE k.task_id = p_old;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    UPDATE "{s}".tasks t SET progress_msg = replace(p_line, '{{moved}}', v_moved::text) WHERE t.id = v_new;
    RETURN QUERY SELECT v_new, v_moved;
END
$$;

-- Replacing a re-enqueued document's finished run, now only for the role that enqueued it.
CREATE OR REPLACE FUNCTION "{s}".replace_document_run(p_doc bigint, p_kept bigint[]) RETURNS void
LANGUAGE plpgsql {definer} AS $$
DECLARE
    v_by text;
BEGIN
    SELECT d.enqueued_by INTO v_by FROM "{s}".documents d WHERE d.id = p_doc;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF NOT "{s}".may_act_for(v_by) THEN
        RAISE EXCEPTION 'document % was enqueued by %; % may replace only its own documents'' runs', p_doc,
            COALESCE(v_by, 'an unknown role'), "{s}".caller() USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM "{s}".chunks WHERE doc_id = p_doc AND (task_id IS NULL OR NOT task_id = ANY (p_kept));
    DELETE FROM "{s}".tasks
    WHERE doc_id = p_doc AND NOT id = ANY (p_kept) AND status IN ('done', 'failed', 'cancelled');
END
$$;
""")
    for signature in DEFINER_FUNCTIONS:
        op.execute(f'REVOKE EXECUTE ON FUNCTION "{s}".{signature} FROM PUBLIC')


def downgrade() -> None:
    s = migration_schema()
    op.execute(f"""
CREATE OR REPLACE FUNCTION "{s}".replace_document_run(p_doc bigint, p_kept bigint[]) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM "{s}".chunks WHERE doc_id = p_doc AND (task_id IS NULL OR NOT task_id = ANY (p_kept));
    DELETE FROM "{s}".tasks
    WHERE doc_id = p_doc AND NOT id = ANY (p_kept) AND status IN ('done', 'failed', 'cancelled');
$$;
DROP FUNCTION IF EXISTS "{s}".reuse_task(bigint, bigint, integer, text, text);
DROP FUNCTION IF EXISTS "{s}".retry_tasks(bigint[], bigint, text, integer);
DROP FUNCTION IF EXISTS "{s}".cancel_tasks(bigint[], bigint, text, integer, text);
DROP FUNCTION IF EXISTS "{s}".cancel_dependents(bigint[], text, integer);
DROP VIEW IF EXISTS "{s}".own_chunks;
DROP TRIGGER IF EXISTS documents_owner_guard ON "{s}".documents;
DROP TRIGGER IF EXISTS tasks_dependents_guard ON "{s}".tasks;
DROP TRIGGER IF EXISTS tasks_insert_guard ON "{s}".tasks;
DROP TRIGGER IF EXISTS tasks_document_guard ON "{s}".tasks;
DROP FUNCTION IF EXISTS "{s}".refuse_foreign_document();
DROP FUNCTION IF EXISTS "{s}".refuse_untrusted();
DROP FUNCTION IF EXISTS "{s}".may_act_for(text);
DROP FUNCTION IF EXISTS "{s}".trusted(text);
DROP FUNCTION IF EXISTS "{s}".caller();
ALTER TABLE "{s}".documents DROP COLUMN IF EXISTS enqueued_by;
ALTER TABLE "{s}".tasks DROP COLUMN IF EXISTS enqueued_by;
""")
