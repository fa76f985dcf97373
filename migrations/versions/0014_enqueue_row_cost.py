"""Batch enqueue (issue 12, target 3): the per-row checks of ``tasks`` that cost more than they say.

``tasks_type_check`` held the type to ``^[A-Za-z0-9_.:-]{1,48}$``. PostgreSQL's regex engine unrolls a
bounded repetition into 48 states and walks them for every row; a length test plus an unbounded class
(``+``) accepts exactly the same strings (every character of the class is one byte, so the byte length
is the character length) for a fraction of the cost.

``tasks_payload_check`` (``octet_length(payload::text) <= 2097152``) printed every payload back to JSON
text on every INSERT *and every UPDATE of the row*: each claim, heartbeat and completion paid for it.
A CHECK cannot be limited to the columns that changed; a trigger can (``UPDATE OF payload``). Its WHEN
clause holds the same test, so a row within the limit never calls the function: the function only
raises the error the CHECK raised (SQLSTATE 23514, constraint ``tasks_payload_check``, the same
message), so jobqueue.db.errors maps it as before. bench/enqueue_cost.py measures what each costs.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

from alembic import op

from jobqueue.states import migration_schema

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

PAYLOAD_LIMIT = 2097152


def upgrade() -> None:
    s = migration_schema()
    op.execute(f"""
ALTER TABLE "{s}".tasks DROP CONSTRAINT tasks_type_check;
ALTER TABLE "{s}".tasks ADD CONSTRAINT tasks_type_check
    CHECK (octet_length(type) BETWEEN 1 AND 48 AND type ~ '^[A-Za-z0-9_.:-]+$');
ALTER TABLE "{s}".tasks DROP CONSTRAINT tasks_payload_check;

-- Raises what the CHECK raised; called only for a payload over the limit (the trigger's WHEN).
CREATE FUNCTION "{s}".refuse_large_payload() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'new row for relation "%" violates check constraint "tasks_payload_check"', TG_TABLE_NAME
        USING ERRCODE = 'check_violation', CONSTRAINT = 'tasks_payload_check', TABLE = TG_TABLE_NAME,
              SCHEMA = TG_TABLE_SCHEMA;
END
$$;
CREATE TRIGGER tasks_payload_check BEFORE INSERT OR UPDATE OF payload ON "{s}".tasks FOR EACH ROW
    WHEN (octet_length(NEW.payload::text) > {PAYLOAD_LIMIT})
    EXECUTE FUNCTION "{s}".refuse_large_payload();
""")


def downgrade() -> None:
    s = migration_schema()
    op.execute(f"""
DROP TRIGGER tasks_payload_check ON "{s}".tasks;
DROP FUNCTION "{s}".refuse_large_payload();
ALTER TABLE "{s}".tasks ADD CONSTRAINT tasks_payload_check CHECK (octet_length(payload::text) <= {PAYLOAD_LIMIT});
ALTER TABLE "{s}".tasks DROP CONSTRAINT tasks_type_check;
ALTER TABLE "{s}".tasks ADD CONSTRAINT tasks_type_check CHECK (type ~ '^[A-Za-z0-9_.:-]{{1,48}}$');
""")
