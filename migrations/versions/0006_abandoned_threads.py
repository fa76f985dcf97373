"""Abandoned threads on the worker's row, and in worker_health: why a worker with free-looking slots claims nothing.

A sync handler past its hard timeout cannot be killed: its task is failed, but its thread keeps a slot
until it returns (issue 11, item 9). The worker counts such threads against its capacity; without
this column an operator saw a worker running fewer tasks than its concurrency and no reason why.

- ``workers.abandoned``: the hard-timed-out handler threads that have not returned, written by the
  worker's heartbeat (0 for a worker of an older version);
- ``worker_health.abandoned``: the same, appended as the view's last column (CREATE OR REPLACE VIEW
  may add columns at the end, so the grants roles hold on the views survive).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from types import ModuleType

from alembic import op

from jobqueue.states import migration_schema, sibling_revision

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_WORKER_COLUMNS = """,
       w.abandoned"""


def _views() -> ModuleType:
    """0004, whose views this revision re-issues with worker_health's new column (one copy of the views)."""
    return sibling_revision("0004_runtime.py")


def upgrade() -> None:
    s = migration_schema()
    op.execute(f'ALTER TABLE "{s}".workers ADD COLUMN abandoned integer NOT NULL DEFAULT 0;')
    op.execute(_views().views_sql(s, worker_columns=_WORKER_COLUMNS))


def recreate_view(s: str, view: str, ddl: str) -> str:
    """Drop view `view` and run `ddl` (its new definition) in one DO block, granting again what the
    view held: a view cannot lose a column in place (0008's downgrade of queue_depth uses it too)."""
    assert "$ddl$" not in ddl
    return f"""
DO $do$
DECLARE
    v_acl aclitem[];
    v_owner oid;
    g record;
BEGIN
    SELECT c.relacl, c.relowner INTO v_acl, v_owner FROM pg_class c
    WHERE c.oid = '"{s}".{view}'::regclass;
    DROP VIEW "{s}".{view};
    EXECUTE $ddl${ddl}$ddl$;
    FOR g IN SELECT a.grantee, a.privilege_type, a.is_grantable FROM aclexplode(v_acl) a
             WHERE a.grantee <> v_owner LOOP
        EXECUTE format('GRANT %s ON "{s}".{view} TO %s%s', g.privilege_type,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$do$;
"""


def downgrade() -> None:
    # A view cannot lose a column in place: worker_health is dropped and created again, and the
    # privileges it held are granted again (so a dashboard role keeps reading it).
    s = migration_schema()
    op.execute(recreate_view(s, "worker_health", _views().views_sql(s)))
    op.execute(f'ALTER TABLE "{s}".workers DROP COLUMN abandoned;')
