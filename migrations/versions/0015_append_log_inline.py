"""append_log inlined into the statements that call it (issue 12, two worker processes).

0001's append_log cut an overflowing log at a line boundary with a scalar sub-SELECT. PostgreSQL
does not inline a SQL function whose body holds a sub-query, so every row of complete_many,
finish_many, progress_many and the rescuer paid a function call: a fresh executor for the body per
row, about a quarter of complete_many's server time per task. The same result without the
sub-query (``strpos`` is 0 when there is no newline, and ``substr(t, 1)`` is ``t``), so the planner
folds the body into the calling statement. Same signature, same results; the overflow branch
computes its cut twice, which only a log at its size limit pays.

The planner still keeps the call when an argument used more than once in the body is itself costly
(finish_many's line with its retry suffix); those statements behave as before.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04
"""

from alembic import op

from jobqueue.states import migration_schema, sibling_revision

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    s = migration_schema()
    op.execute(f"""
CREATE OR REPLACE FUNCTION "{s}".append_log(log text, lines text, max_chars integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN lines IS NULL OR lines = '' THEN log
        WHEN length(log) + length(lines) + 1 <= max_chars
            THEN CASE WHEN log = '' THEN lines ELSE log || E'\\n' || lines END
        ELSE substr(right(CASE WHEN log = '' THEN lines ELSE log || E'\\n' || lines END, max_chars),
                    strpos(right(CASE WHEN log = '' THEN lines ELSE log || E'\\n' || lines END, max_chars),
                           E'\\n') + 1)
    END
$$;
""")


def downgrade() -> None:
    s = migration_schema()
    op.execute(sibling_revision("0001_tasks.py").append_log_sql(s, create="CREATE OR REPLACE FUNCTION"))
