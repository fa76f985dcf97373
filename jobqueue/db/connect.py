"""Which database jobq talks to, and how it connects.

``JOBQ_DATABASE_URL`` names a real server; without it jobq uses the embedded server under
``JOBQ_HOME`` if it is already running. Resolving a URL never starts anything: only the CLI and
admin start the embedded server (:func:`jobqueue.admin.embedded.start_if_needed`), so a library
call cannot fork a PostgreSQL server as a side effect. Connection errors become
:class:`DatabaseUnavailable` with the password removed from the URL, so a URL never leaks into a
log line or an error message.

The settings and the embedded-server module are imported by the functions that need them: with a
URL in hand, `connect` loads neither (the read-only CLI's start-up, bench/startup.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from jobqueue.errors import ConfigurationError, DatabaseUnavailable

if TYPE_CHECKING:
    import psycopg

    from jobqueue.settings import Settings

_DRIVER = re.compile(r"^postgres(?:ql)?(\+\w+)?://")


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def redact_text(text: str) -> str:
    """Remove passwords from any postgres URL inside an arbitrary message."""
    return re.sub(r"(postgres(?:ql)?(?:\+\w+)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def normalize(url: str) -> str:
    """A libpq URL (no SQLAlchemy driver suffix), validated enough to give a clear error."""
    m = _DRIVER.match(url)
    if not m:
        raise ConfigurationError(
            f"not a PostgreSQL URL: {redact(url)!r} (expected postgresql://user:password@host:port/dbname)"
        )
    return "postgresql://" + url[m.end():]


def sqlalchemy_url(url: str) -> str:
    return "postgresql+psycopg://" + normalize(url)[len("postgresql://"):]


def resolve_url(settings: Settings | None = None) -> str:
    """The libpq URL of the queue's database: the configured one, else the running embedded server's."""
    from jobqueue.admin import embedded
    from jobqueue.settings import get_settings

    settings = settings or get_settings()
    if settings.database_url:
        return normalize(settings.database_url)
    info = embedded.read_running(embedded.pgdata_dir(settings.home))
    if info is None:
        raise ConfigurationError(
            "no database: set JOBQ_DATABASE_URL, or run `jobq db start` to start the embedded server "
            f"under {settings.home}"
        )
    return info.url()


def is_embedded(settings: Settings | None = None) -> bool:
    from jobqueue.settings import get_settings

    return not (settings or get_settings()).database_url


def connect(url: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection with errors turned into one readable line.

    psycopg is imported here, not with the module: a worker, whose runtime is on asyncpg, never loads it.
    """
    import psycopg

    url = url or resolve_url()
    try:
        return psycopg.connect(url, **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {first_line(exc)}") from None
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"bad database URL {redact(url)}: {first_line(exc)}") from None


async def aconnect(url: str | None = None, **kwargs: Any) -> Any:
    """An asyncpg connection with the same error mapping as :func:`connect`."""
    import asyncpg

    url = url or resolve_url()
    try:
        return await asyncpg.connect(url, **kwargs)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """An error's first line with any URL password removed: the CLI prints one line, never a payload."""
    text = str(exc).strip().splitlines()
    return redact_text(text[0] if text else type(exc).__name__)
