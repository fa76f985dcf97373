"""A document's earlier runs kept as history; 1-based page numbers in the document views.

Re-enqueueing a document (or ``--force``) used to delete the previous run's finished tasks, so the
dashboards' history ("done in the last hour") shrank whenever a document was processed again (issue
13). Now those tasks stay, marked superseded, until the pruner removes them like any other finished
task:

- ``tasks.superseded_at``: when a later run of the task's document replaced it (NULL: the task
  belongs to its document's current run, or to no document); ``tasks.superseded_by``: the batch of
  that later run (no foreign key: batches may be deleted, the mark stays);
- ``replace_document_run`` marks the previous run's finished tasks instead of deleting them (the
  chunks no kept task took over still go: a document has one set of chunks);
- ``document_progress`` (and so ``batch_progress``, ``jobq docs``, ``jobq watch``) reads the current
  run only: a document's state is its current run's; the throughput and queue views still count every
  finished task, superseded or not;
- ``retry_tasks`` leaves superseded tasks alone (retrying one would write chunks beside the current
  run's).

Pages: the tables keep their stored conventions (``chunks.from_page/to_page`` 0-based inclusive,
``tasks.from_page/to_page`` 0-based with the end excluded, as the splitter and handlers use them);
what users read is 1-based inclusive, as page numbers are printed: the new views ``document_tasks`` and
``document_chunks`` show ``first_page``/``last_page`` so, and so do the progress messages ("Page(1~12)").

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from types import ModuleType

from alembic import op
from sqlalchemy import text

from jobqueue.states import migration_schema, sibling_revision

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_REPLACE_RUN = "replace_document_run(bigint, bigint[])"
_RETRY = "retry_tasks(bigint[], bigint, text, integer)"


def _progress() -> ModuleType:
    """0002, whose document_progress this revision re-issues reading the current run only."""
    return sibling_revision("0002_documents.py")


def _edits(s: str) -> dict[str, list[tuple[str, str]]]:
    """The text changes to the functions' bodies (before, after), applied to the definitions in the
    database, so a function is changed in place (grants kept) and not repeated here."""
    return {
        _REPLACE_RUN: [(
            f"""DELETE FROM "{s}".tasks
    WHERE doc_id = p_doc AND NOT id = ANY (p_kept) AND status IN ('done', 'failed', 'cancelled');""",
            f"""UPDATE "{s}".tasks t
    SET superseded_at = now(), superseded_by = (SELECT d.batch_id FROM "{s}".documents d WHERE d.id = p_doc)
    FROM (SELECT o.id FROM "{s}".tasks o
          WHERE o.doc_id = p_doc AND NOT o.id = ANY (p_kept) AND o.status IN ('done', 'failed', 'cancelled')
            AND o.superseded_at IS NULL
          ORDER BY o.id FOR NO KEY UPDATE) AS old_run  -- rows locked in id order, as every statement does
    WHERE t.id = old_run.id;""")],
        _RETRY: [("(t.id = ANY (p_ids) OR t.doc_id = p_doc) AND t.status IN ('failed', 'cancelled')",
                  "(t.id = ANY (p_ids) OR t.doc_id = p_doc) AND t.status IN ('failed', 'cancelled')"
                  " AND t.superseded_at IS NULL")],
    }


def _rewrite(s: str, *, reverse: bool) -> None:
    conn = op.get_bind()
    for signature, edits in _edits(s).items():
        ddl = conn.execute(text(f"SELECT pg_get_functiondef('\"{s}\".{signature}'::regprocedure)")).scalar_one()
        for before, after in edits:
            old, new = (after, before) if reverse else (before, after)
            if old not in ddl:
                raise RuntimeError(f"{signature}: the text this revision changes is not in its definition")
            ddl = ddl.replace(old, new)
        op.execute(ddl)


def _views(s: str) -> str:
    return f"""
-- A document's tasks, current run and history, with the pages they cover numbered as printed
-- (1-based, last page included); NULL for a task of the whole document (raptor).
CREATE VIEW "{s}".document_tasks AS
SELECT t.id AS task_id, t.doc_id, t.batch_id, t.type, t.status, t.progress,
       t.from_page + 1 AS first_page, t.to_page AS last_page,
       t.superseded_at IS NULL AS current, t.superseded_at, t.superseded_by,
       t.created_at, t.started_at, t.finished_at, t.process_duration, t.last_error
FROM "{s}".tasks t
WHERE t.doc_id IS NOT NULL;

-- A document's chunks (level 0) and RAPTOR summaries (level 1, 2, ...), pages numbered as printed.
CREATE VIEW "{s}".document_chunks AS
SELECT k.id AS chunk_id, k.doc_id, k.task_id, k.level, k.parent_id, k.position,
       k.from_page + 1 AS first_page, k.to_page + 1 AS last_page, k.token_count, k.text, k.created_at
FROM "{s}".chunks k;
"""


def upgrade() -> None:
    s = migration_schema()
    op.execute(f"""
ALTER TABLE "{s}".tasks ADD COLUMN superseded_at timestamptz, ADD COLUMN superseded_by bigint;
""")
    _rewrite(s, reverse=False)
    op.execute(_progress().document_progress_sql(s, current_run=True, create="CREATE OR REPLACE VIEW"))
    op.execute(_views(s))


def downgrade() -> None:
    s = migration_schema()
    op.execute(f"""
DROP VIEW IF EXISTS "{s}".document_chunks;
DROP VIEW IF EXISTS "{s}".document_tasks;
""")
    op.execute(_progress().document_progress_sql(s, create="CREATE OR REPLACE VIEW"))
    _rewrite(s, reverse=True)
    # Before this revision a document had one run: the history goes.
    op.execute(f"""
DELETE FROM "{s}".tasks WHERE superseded_at IS NOT NULL;
ALTER TABLE "{s}".tasks DROP COLUMN superseded_by, DROP COLUMN superseded_at;
""")
