"""flow_control reads the live rows of each flow-controlled type through indexes (issue 16, web console).

0009's view found them with ``status IN ('queued', 'running')`` joined to ``flow_rules``: no index
holds both statuses, so it scanned all of ``tasks`` (3.7 s on the 10-million-row history, the web
console's overview reads it). Now, per rule, the queued rows come from the claim index
(``tasks_claim_idx``, led by the type) and the running ones from the lease index (a running task
always holds a lease; queue_depth and queue_state count running the same way): the view's cost
follows the live rows of those types, not the history. Same columns, same values.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from alembic import op

from jobqueue.states import migration_schema, sibling_revision

revision = "0012"
down_revision = "0011"
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
    view = sibling_revision("0009_flow_control.py").flow_control_sql
    op.execute(view(migration_schema(), keyed=KEYED, create="CREATE OR REPLACE VIEW"))


def downgrade() -> None:
    view = sibling_revision("0009_flow_control.py").flow_control_sql
    op.execute(view(migration_schema(), create="CREATE OR REPLACE VIEW"))
