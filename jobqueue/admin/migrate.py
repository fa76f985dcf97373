"""Run alembic programmatically, to head, safely from many processes at once (see migrations/env.py)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from jobqueue.admin.embedded import start_if_needed
from jobqueue.db.connect import normalize, redact_text
from jobqueue.errors import DatabaseUnavailable
from jobqueue.settings import get_settings


def alembic_config(url: str | None = None, schema: str | None = None) -> Config:
    import importlib

    # The repository's migrations/ folder, packaged as jobqueue.migrations.
    migrations = importlib.import_module("jobqueue.migrations")
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(str(migrations.__file__)).parent))
    cfg.attributes["url"] = normalize(url) if url else start_if_needed(get_settings())  # admin may start it
    cfg.attributes["schema"] = schema or get_settings().schema_name
    return cfg


def migrate(url: str | None = None, schema: str | None = None, revision: str = "head") -> None:
    import sqlalchemy.exc

    try:
        command.upgrade(alembic_config(url, schema), revision)
    except sqlalchemy.exc.OperationalError as exc:
        raise DatabaseUnavailable(redact_text(str(exc.orig).strip().splitlines()[0])) from None


def current(url: str | None = None, schema: str | None = None) -> str | None:
    """The alembic revision the schema is at (None: not migrated)."""
    import psycopg

    from jobqueue.admin.revision import stamped

    cfg = alembic_config(url, schema)
    with psycopg.connect(cfg.attributes["url"]) as conn:
        _, found = stamped(conn, cfg.attributes["schema"])
    return max(found) if found else None
