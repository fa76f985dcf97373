"""Views read columns, not message text: why a task was requeued, and each worker's own lease.

0003's views recognised a rescued attempt by matching the rescuer's message
(``last_error LIKE 'worker % lost (lease expired)'``) and called a worker stale after a literal 30 s.
A reworded message or a worker with a longer lease broke them silently. Now:

- ``tasks.requeue_reason``: why the task last went back to the queue: ``'lost'`` (the rescuer took
  it from a worker whose lease expired) or ``'error'`` (its handler failed and a retry was scheduled);
  NULL when it never was;
- ``workers.lease_seconds``: the lease this worker takes on its tasks, written by its heartbeat;
  worker_health calls a worker stale when it has not been seen for that long (30 s when unknown,
  i.e. a worker of an older version).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from types import ModuleType

from alembic import op

from jobqueue.states import migration_schema, sibling_revision

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_RETRY_AT = """CASE WHEN t.requeue_reason = 'lost'
                 OR t.started_at IS NULL OR t.process_duration IS NULL THEN t.run_at
            ELSE t.started_at + t.process_duration * interval '1 second' END"""

_ERROR_KEY = r"""CASE WHEN r.requeue_reason = 'lost'
                 THEN 'worker lost (lease expired)'
            ELSE left(regexp_replace(substring(rtrim(r.last_error, E' \n\r\t') FROM '[^\n]*$'),
                                     '0x[0-9a-fA-F]+|[0-9]+', 'N', 'g'), 200) END"""

_STALE_AFTER = "make_interval(secs => COALESCE(w.lease_seconds, 30))"


def _views() -> ModuleType:
    """0003, whose view text this revision re-issues with the parts above replaced (one copy of the views)."""
    return sibling_revision("0003_views.py")


def upgrade() -> None:
    s = migration_schema()
    op.execute(f"""
ALTER TABLE "{s}".tasks ADD COLUMN requeue_reason text
    CONSTRAINT tasks_requeue_reason_check CHECK (requeue_reason IN ('lost', 'error'));
UPDATE "{s}".tasks SET requeue_reason = 'lost' WHERE last_error LIKE 'worker % lost (lease expired)';
ALTER TABLE "{s}".workers ADD COLUMN lease_seconds real;
""")
    # Replaced in place (same columns), so the grants roles hold on the views survive.
    op.execute(views_sql(s))


def views_sql(s: str, *, worker_columns: str = "", create: str = "CREATE OR REPLACE VIEW") -> str:
    """The views as this revision defines them (0006 re-issues them with a column added)."""
    ddl = _views().views_sql(s, retry_at=_RETRY_AT, error_key=_ERROR_KEY, stale_after=_STALE_AFTER,
                             worker_columns=worker_columns, create=create)
    return ddl.replace("SELECT t.id, t.type, t.status, t.last_error,",
                       "SELECT t.id, t.type, t.status, t.last_error, t.requeue_reason,")


def downgrade() -> None:
    s = migration_schema()
    op.execute(_views().views_sql(s, create="CREATE OR REPLACE VIEW"))
    op.execute(f"""
ALTER TABLE "{s}".tasks DROP COLUMN requeue_reason;
ALTER TABLE "{s}".workers DROP COLUMN lease_seconds;
""")
