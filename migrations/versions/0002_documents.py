"""Documents, their batches and chunks; document and batch roll-up views; queue position.

The document pipeline's tables live in jobq's schema so that a worker on any host can process a
document with nothing but the database: the bytes are stored here unless the producer chose to
store only a path on shared storage. Progress per document is a view over the tasks table, so it is
exact at every moment and needs no poller to keep it up to date.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op

from jobqueue.settings import get_settings
from jobqueue.states import migration_schema

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def document_progress_sql(s: str, *, current_run: bool = False, create: str = "CREATE VIEW") -> str:
    """document_progress's DDL; `current_run` (0007) reads only the tasks of the document's current
    run, leaving the superseded runs kept as history out of its state."""

    def current(alias: str) -> str:
        return f" AND {alias}.superseded_at IS NULL" if current_run else ""

    return f"""-- A document's state as RAGFlow users know it, computed from its tasks: progress is the mean of the
-- tasks' progress (errors count as 0); finished documents are failed if any task failed, cancelled
-- if any was cancelled, else done; unfinished ones are running once any task started, else queued.
CREATE VIEW "{s}".document_progress AS
SELECT d.id AS doc_id, d.name, d.owner, d.batch_id, d.format, d.kind, d.parser, d.pages, d.size,
       d.uri IS NOT NULL AS by_reference, d.created_at,
       COALESCE(t.tasks, 0) AS tasks,
       COALESCE(t.waiting, 0) AS waiting, COALESCE(t.queued, 0) AS queued,
       COALESCE(t.running, 0) AS running, COALESCE(t.done, 0) AS done,
       COALESCE(t.failed, 0) AS failed, COALESCE(t.cancelled, 0) AS cancelled,
       COALESCE(t.progress, 0)::real AS progress,
       CASE
           WHEN COALESCE(t.tasks, 0) = 0 THEN CASE WHEN c.chunks > 0 THEN 'done' ELSE 'queued' END
           WHEN t.live = 0 AND t.failed > 0 THEN 'failed'
           WHEN t.live = 0 AND t.cancelled > 0 THEN 'cancelled'
           WHEN t.live = 0 THEN 'done'
           WHEN t.started THEN 'running'
           ELSE 'queued'
       END AS status,
       (SELECT "{s}".queue_position(q.id) FROM "{s}".tasks q
        WHERE q.doc_id = d.id AND q.status = 'queued'{current("q")}
        ORDER BY q.priority DESC, q.run_at, q.id LIMIT 1) AS queue_position,
       COALESCE(t.progress_msg, '') AS progress_msg,
       (SELECT line FROM "{s}".tasks m, regexp_split_to_table(m.progress_msg, E'\\n') WITH ORDINALITY AS l(line, n)
        WHERE m.doc_id = d.id AND m.progress_msg <> ''{current("m")}
        ORDER BY left(line, 8) DESC, m.id DESC, l.n DESC LIMIT 1) AS last_message,
       (SELECT m.last_error FROM "{s}".tasks m
        WHERE m.doc_id = d.id AND m.status = 'failed'{current("m")} ORDER BY m.id LIMIT 1) AS error,
       COALESCE(c.chunks, 0) AS chunks, COALESCE(c.tokens, 0) AS tokens, COALESCE(c.summaries, 0) AS summaries,
       t.started_at, CASE WHEN t.live = 0 THEN t.finished_at END AS finished_at,
       extract(epoch FROM (CASE WHEN t.live = 0 THEN t.finished_at ELSE now() END) - t.started_at) AS duration,
       COALESCE(t.process_duration, 0) AS process_duration
FROM "{s}".documents d
LEFT JOIN LATERAL (
    SELECT count(*) AS tasks,
           count(*) FILTER (WHERE x.status = 'waiting') AS waiting,
           count(*) FILTER (WHERE x.status = 'queued') AS queued,
           count(*) FILTER (WHERE x.status = 'running') AS running,
           count(*) FILTER (WHERE x.status = 'done') AS done,
           count(*) FILTER (WHERE x.status = 'failed' OR x.progress < 0) AS failed,
           count(*) FILTER (WHERE x.status = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE x.status IN ('waiting', 'queued', 'running')) AS live,
           bool_or(x.status IN ('running', 'done', 'failed', 'cancelled') OR x.started_at IS NOT NULL) AS started,
           avg(greatest(x.progress, 0)) AS progress,
           string_agg(NULLIF(x.progress_msg, ''), E'\\n' ORDER BY x.depends_on IS NOT NULL, x.from_page, x.id)
               AS progress_msg,
           min(COALESCE(x.started_at, x.finished_at)) AS started_at,
           max(x.finished_at) AS finished_at,
           sum(x.process_duration) AS process_duration
    FROM "{s}".tasks x WHERE x.doc_id = d.id{current("x")}
) t ON true
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE k.level = 0) AS chunks,
           COALESCE(sum(k.token_count) FILTER (WHERE k.level = 0), 0) AS tokens,
           count(*) FILTER (WHERE k.level > 0) AS summaries
    FROM "{s}".chunks k WHERE k.doc_id = d.id
) c ON true;
""".replace("CREATE VIEW", create)


def upgrade() -> None:
    s = migration_schema()
    # The database refuses stored bytes over the limit in force when the schema was created, whatever
    # client writes the row; Python checks the (possibly lower) current setting first and says why.
    limit = int(get_settings().max_document_bytes)
    op.execute(f"""
CREATE TABLE "{s}".batches (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner       text,
    -- Files named by the call, and those refused with an error (they have no document row).
    requested   integer NOT NULL DEFAULT 0,
    rejected    integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE "{s}".documents (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The batch that last enqueued the document (re-enqueueing moves it to the new batch).
    batch_id       bigint REFERENCES "{s}".batches (id) ON DELETE SET NULL,
    name           text NOT NULL,
    size           bigint NOT NULL CHECK (size >= 0),
    -- Concrete format (pdf, csv, xlsx, md, ...) and the kind the splitter cut it by (pdf, table, text).
    format         text NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('pdf', 'table', 'text')),
    parser         text NOT NULL,
    -- Pages of a PDF, data rows of a table, 1 otherwise.
    pages          integer NOT NULL CHECK (pages >= 0),
    content_digest text NOT NULL,
    -- Exactly one of: the bytes, or a path/URI on storage every worker can read (--by-reference).
    content        bytea CONSTRAINT documents_size_limit CHECK (octet_length(content) <= {limit}),
    uri            text,
    owner          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT documents_storage CHECK ((content IS NULL) <> (uri IS NULL)),
    CONSTRAINT documents_size_matches CHECK (content IS NULL OR octet_length(content) = size)
);
-- A document is its bytes (per owner): enqueueing the same content again re-parses that document,
-- which is what lets unchanged task ranges reuse their chunks.
CREATE UNIQUE INDEX documents_content_idx ON "{s}".documents ((COALESCE(owner, '')), content_digest);
CREATE INDEX documents_batch_idx ON "{s}".documents (batch_id) WHERE batch_id IS NOT NULL;

-- Deleting a document deletes its tasks (and so its roll-up); a pruned batch only unlinks them.
ALTER TABLE "{s}".tasks
    ADD CONSTRAINT tasks_doc_fk FOREIGN KEY (doc_id) REFERENCES "{s}".documents (id) ON DELETE CASCADE,
    ADD CONSTRAINT tasks_batch_fk FOREIGN KEY (batch_id) REFERENCES "{s}".batches (id) ON DELETE SET NULL;
CREATE INDEX tasks_batch_idx ON "{s}".tasks (batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE "{s}".chunks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doc_id      bigint NOT NULL REFERENCES "{s}".documents (id) ON DELETE CASCADE,
    -- The task that wrote the chunk. The pruner deletes old tasks but never their chunks.
    task_id     bigint REFERENCES "{s}".tasks (id) ON DELETE SET NULL,
    -- 0 for text chunks; 1, 2, ... for RAPTOR summaries of the level below.
    level       integer NOT NULL DEFAULT 0 CHECK (level >= 0),
    -- The RAPTOR summary this chunk (or summary) belongs to.
    parent_id   bigint REFERENCES "{s}".chunks (id) ON DELETE SET NULL,
    position    integer NOT NULL,
    -- 0-based pages (or table rows) the text came from, inclusive.
    from_page   integer NOT NULL,
    to_page     integer NOT NULL,
    text        text NOT NULL,
    token_count integer NOT NULL CHECK (token_count >= 0),
    digest      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chunks_doc_idx ON "{s}".chunks (doc_id, level, from_page, position);
CREATE INDEX chunks_task_idx ON "{s}".chunks (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX chunks_parent_idx ON "{s}".chunks (parent_id) WHERE parent_id IS NOT NULL;

-- "N tasks ahead": the queued tasks of the same type that the claim takes before this one (higher
-- priority, or equal priority and earlier (run_at, id)). Two range scans of the claim index.
-- Re-enqueueing a document replaces its previous (finished) run: its tasks and the chunks no kept
-- task took over. SECURITY DEFINER so that a producer needs no DELETE privilege of its own: this is
-- the only delete it can do (EXECUTE is granted by `jobq roles`, revoked from PUBLIC here).
CREATE FUNCTION "{s}".replace_document_run(p_doc bigint, p_kept bigint[]) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM "{s}".chunks WHERE doc_id = p_doc AND (task_id IS NULL OR NOT task_id = ANY (p_kept));
    DELETE FROM "{s}".tasks
    WHERE doc_id = p_doc AND NOT id = ANY (p_kept) AND status IN ('done', 'failed', 'cancelled');
$$;
REVOKE EXECUTE ON FUNCTION "{s}".replace_document_run(bigint, bigint[]) FROM PUBLIC;

CREATE FUNCTION "{s}".queue_position(task_id bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN t.status <> 'queued' THEN NULL ELSE
        (SELECT count(*) FROM "{s}".tasks a
         WHERE a.status = 'queued' AND a.type = t.type AND a.priority > t.priority AND a.run_at <= now())
      + (SELECT count(*) FROM "{s}".tasks a
         WHERE a.status = 'queued' AND a.type = t.type AND a.priority = t.priority
           AND (a.run_at, a.id) < (t.run_at, t.id) AND a.run_at <= now())
    END
    FROM "{s}".tasks t WHERE t.id = task_id
$$;

{document_progress_sql(s)}
-- A batch (one `jobq enqueue` call): its files and how many of them finished, well or not.
CREATE VIEW "{s}".batch_progress AS
SELECT b.id AS batch_id, b.owner, b.created_at, b.requested, b.rejected,
       count(p.doc_id) AS files,
       count(p.doc_id) FILTER (WHERE p.status IN ('done', 'failed', 'cancelled')) AS processed,
       count(p.doc_id) FILTER (WHERE p.status = 'done') AS succeeded,
       count(p.doc_id) FILTER (WHERE p.status = 'failed') AS failed,
       count(p.doc_id) FILTER (WHERE p.status = 'cancelled') AS cancelled,
       COALESCE(avg(p.progress), 0)::real AS progress,
       COALESCE(sum(p.chunks), 0) AS chunks
FROM "{s}".batches b
LEFT JOIN "{s}".document_progress p ON p.batch_id = b.id
GROUP BY b.id;
""")


def downgrade() -> None:
    s = migration_schema()
    op.execute(f"""
DROP VIEW IF EXISTS "{s}".batch_progress;
DROP VIEW IF EXISTS "{s}".document_progress;
DROP FUNCTION IF EXISTS "{s}".queue_position(bigint);
DROP FUNCTION IF EXISTS "{s}".replace_document_run(bigint, bigint[]);
DROP TABLE IF EXISTS "{s}".chunks;
ALTER TABLE "{s}".tasks DROP CONSTRAINT IF EXISTS tasks_doc_fk, DROP CONSTRAINT IF EXISTS tasks_batch_fk;
DROP INDEX IF EXISTS "{s}".tasks_batch_idx;
DROP TABLE IF EXISTS "{s}".documents;
DROP TABLE IF EXISTS "{s}".batches;
""")
