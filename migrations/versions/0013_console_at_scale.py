"""The web console at 10 million rows (issue 16): flow_control and failures read through indexes.

``flow_control`` (the console's overview, ``jobq top``): 0009's view found each flow-controlled
type's live rows with ``status IN ('queued', 'running')`` joined to ``flow_rules``; no index holds
both statuses, so it scanned all of ``tasks`` (2.4 s against 8 ms on the 10-million-row history).
Now, per rule, the queued rows come from the claim index (``tasks_claim_idx``, led by the type) and
the running ones from the lease index (a running task always holds a lease; queue_depth and
queue_state count running the same way): the view's cost follows the live rows of those types, not
the history. Same columns, same values.

``tasks_errors_idx``: the finished tasks that carry an error, by finish time. The failures view (the
console's failures page, ``jobq top``, the exporter) reads the last 24 hours of those; through
``tasks_finished_idx`` it read every task finished in that window and dropped the ones without an
error (96 % of them on the test history): 214 ms against 73 ms on 10 million rows (interleaved).
Only rows with an error are in it, so a success writes nothing more. Building it holds writes to
``tasks`` for the build (4 s on those 10 million rows, on this 2-core machine).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from alembic import op

from jobqueue.states import migration_schema, sibling_revision

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

KEYED = """
    SELECT r.type, "{s}".flow_key(r.key, t.owner, t.doc_id, t.batch_id, t.payload) AS key,
           count(*) FILTER (WHERE t.status = 'queued' AND t.run_at <= now()) AS queued,
           count(*) FILTER (WHERE t.status = 'running') AS running
    FROM "{s}".flow_rules r
    CROSS JOIN LATERAL (
        SELECT q.status, q.run_at, q.owner, q.doc_id, q.batch_id, q.payload FROM "{s}".tasks q
        WHERE q.type = r.type AND q.status = 'queued'
        UNION ALL
        SELECT q.status, q.run_at, q.owner, q.doc_id, q.batch_id, q.payload FROM "{s}".tasks q
        WHERE q.type = r.type AND q.status = 'running' AND q.lease_expires_at IS NOT NULL
    ) t
    GROUP BY 1, 2
"""


def upgrade() -> None:
    s = migration_schema()
    view = sibling_revision("0009_flow_control.py").flow_control_sql
    op.execute(view(s, keyed=KEYED, create="CREATE OR REPLACE VIEW"))
    op.execute(f'CREATE INDEX tasks_errors_idx ON "{s}".tasks (finished_at) '
               "WHERE last_error IS NOT NULL AND finished_at IS NOT NULL")


def downgrade() -> None:
    s = migration_schema()
    view = sibling_revision("0009_flow_control.py").flow_control_sql
    op.execute(view(s, create="CREATE OR REPLACE VIEW"))
    op.execute(f'DROP INDEX "{s}".tasks_errors_idx')
