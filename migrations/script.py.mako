"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from alembic import op

from jobqueue.schema import migration_schema

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    s = migration_schema()
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    s = migration_schema()
    ${downgrades if downgrades else "pass"}
