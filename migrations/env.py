"""Alembic environment for jobq.

Runs every pending migration in one transaction while holding a session advisory lock, so
several processes running ``jobq migrate`` (or starting workers) at once are safe: the first
migrates, the others wait and then find the schema at head.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from jobqueue.db.connect import resolve_url, sqlalchemy_url
from jobqueue.settings import get_settings
from jobqueue.states import MIGRATION_LOCK_KEY

config = context.config
schema = config.attributes.get("schema")
url = config.attributes.get("url")
if schema is None or url is None:
    # Plain `alembic upgrade head`: take the same settings jobq itself uses.
    schema = schema or get_settings().schema_name
    url = url or resolve_url()
    config.attributes["schema"] = schema
sa_url = sqlalchemy_url(url)


def _run() -> None:
    engine = create_engine(sa_url)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        conn.commit()
        try:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            conn.commit()
            context.configure(
                connection=conn,
                version_table_schema=schema,
                transaction_per_migration=False,
            )
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
            conn.commit()
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=sa_url, literal_binds=True, version_table_schema=schema)
    with context.begin_transaction():
        context.run_migrations()
else:
    _run()
