"""The trace context of the enqueueing code, carried in the task row (issue 15, tracing).

- ``tasks.trace_context`` (jsonb, nullable): the W3C trace context (traceparent, tracestate) of the
  span that was current when the task was enqueued (jobqueue/tracing.py); NULL when none was, or
  when the extra ``jobq[otel]`` is not installed. The worker's span for each attempt is its child.
- Producers insert it as they insert the other enqueue columns: every role that already holds
  column INSERT on tasks (``jobq roles`` grants them column by column) gets it on the new column
  too, so existing producers keep enqueueing without running ``jobq roles`` again.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from alembic import op

from jobqueue.states import migration_schema

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    s = migration_schema()
    op.execute(f"""
ALTER TABLE "{s}".tasks ADD COLUMN trace_context jsonb;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT g.grantee::regrole::text AS role
             FROM pg_attribute a, aclexplode(a.attacl) g
             WHERE a.attrelid = '"{s}".tasks'::regclass AND a.attname = 'type'
               AND g.privilege_type = 'INSERT' AND g.grantee <> 0 LOOP
        EXECUTE format('GRANT INSERT (trace_context) ON "{s}".tasks TO %s', r.role);
    END LOOP;
END
$$;
""")


def downgrade() -> None:
    s = migration_schema()
    op.execute(f'ALTER TABLE "{s}".tasks DROP COLUMN trace_context;')
