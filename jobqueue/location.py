"""Where the queue is (database URL and schema), read from the environment without pydantic.

Building :class:`~jobqueue.settings.Settings` imports pydantic and pydantic-settings, about a third
of a read-only command's start-up (bench/startup.py). `jobq ls` needs only these two values, so it
reads them as pydantic-settings does (``JOBQ_*`` names, case-insensitive, no .env file) and defers
to Settings whenever the answer is not plain: no URL (the embedded server's home and state come
from Settings) or a schema name that Settings would refuse with its own message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from jobqueue.db.connect import normalize

# A schema name jobq accepts: a lower-case SQL identifier that needs no quoting (Settings checks it too).
IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Location:
    url: str  # a libpq URL (normalized)
    schema: str


def quick(database_url: str | None = None, environ: Mapping[str, str] | None = None) -> Location | None:
    """The URL (the --database-url option first) and schema, or None when only Settings can tell."""
    env = os.environ if environ is None else environ
    found = {k.upper(): v for k, v in env.items() if k[:5].upper() == "JOBQ_"}
    url = database_url or found.get("JOBQ_DATABASE_URL")
    schema = found.get("JOBQ_SCHEMA", "jobq")
    if not url or not IDENT.match(schema):
        return None
    return Location(normalize(url), schema)
