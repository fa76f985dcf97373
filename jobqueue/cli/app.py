"""The base of the ``jobq`` command line: the Typer app, its consoles, the global options and the helpers
every command module uses. It imports no command module (cli/__init__.py registers them).

Settings are built once per invocation, from the environment and the global options, when a command
first reads them with :func:`settings`, and passed down to the library; a read-only command that
has a URL reads through :func:`reading` and never builds them. Nothing is written to ``os.environ``.

Start-up time matters here (`jobq ls` in a shell loop, a worker in a container): the module imports
typer and rich only, everything else is imported by the command that needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from jobqueue.admin.revision import SchemaState
    from jobqueue.client.sync import Client
    from jobqueue.db.queries import ClientSQL
    from jobqueue.db.reader import Reader
    from jobqueue.settings import Settings

app = typer.Typer(
    name="jobq",
    help="jobq: a durable job queue whose broker is PostgreSQL. The tasks table is the queue.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

out = Console()
err = Console(stderr=True)
# This invocation: the --database-url option (set by the callback; a list so no `global` is needed)
# and the settings built from it on first use. A read-only command may never build them.
_option: list[str | None] = []
_invocation: list[Settings] = []


def error_line(message: str) -> None:
    """The one line every user error ends in; the message is text, never rich markup."""
    from jobqueue.db.connect import redact_text

    err.print(f"[bold red]error:[/] {escape(redact_text(message))}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    error_line(message)
    raise typer.Exit(code)


@app.callback()
def _global(
    database_url: Annotated[str | None, typer.Option(
        "--database-url", envvar="JOBQ_DATABASE_URL", show_envvar=True,
        help="PostgreSQL URL; without one, the embedded server is used.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    _option[:] = [database_url]
    _invocation.clear()  # main() may run several times in one process (the fuzz tests do)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def settings() -> Settings:
    """This invocation's settings (environment + global options), built on first use; outside a
    command, the environment's. Built lazily: pydantic-settings is a third of `jobq ls`'s start-up."""
    from jobqueue.settings import get_settings

    if _invocation:
        return _invocation[-1]
    if not _option:
        return get_settings()
    get_settings.cache_clear()
    built = get_settings()
    if _option[0]:
        built = built.model_copy(update={"database_url": _option[0]})
    _invocation.append(built)
    return built


@contextmanager
def reading() -> Iterator[tuple[Reader, ClientSQL]]:
    """One connection for a read-only command, the schema checked on it, and the client's statements.
    With a URL in the environment or the options, neither the settings nor a client (with its pydantic
    models) is built and one connection does the check and the reads; without one, the embedded server
    is found (and migrated) through the settings as by every command. The connection is asyncpg's,
    which imports in about half of psycopg's time (db/reader.py)."""
    from jobqueue.admin.revision import SchemaState, aschema_state
    from jobqueue.db import reader
    from jobqueue.db.queries import ClientSQL
    from jobqueue.location import quick

    found = quick(_option[0] if _option else None)
    if found is None:
        s = settings()
        url, schema = ensure_schema(s, asyncpg=True), s.schema_name
    else:
        url, schema = found.url, found.schema
    with reader.reading(url) as r:
        if found is not None and (state := r.run(aschema_state(r.conn, schema))) is not SchemaState.CURRENT:
            state.raise_for(schema)
        yield r, ClientSQL.load(schema)


def database_url(s: Settings | None = None) -> str:
    """The libpq URL every command connects to: the one place the CLI resolves it (and, without
    JOBQ_DATABASE_URL, starts the embedded server)."""
    from jobqueue.admin.embedded import start_if_needed

    return start_if_needed(s or settings())


def ensure_schema(s: Settings | None = None, *, asyncpg: bool = False) -> str:
    """Check that jobq's schema is at this jobq's revision and return the URL checked.

    The embedded server is migrated on demand; a real server must have been migrated (`jobq migrate`).
    The check reads the alembic_version table and compares it with the head revision read from the
    migration files (admin/revision.py), so a read-only command never imports alembic. `asyncpg`: check
    on asyncpg (the worker, whose runtime is on it, then never imports psycopg).
    """
    from jobqueue.admin.revision import SchemaState

    s = s or settings()
    url = database_url(s)
    state = _schema_state_asyncpg(url, s.schema_name) if asyncpg else _schema_state(url, s.schema_name)
    if state is SchemaState.CURRENT:
        return url
    from jobqueue.db.connect import is_embedded

    if is_embedded(s) and state is not SchemaState.NEWER:
        from jobqueue.admin.migrate import migrate

        migrate(url, s.schema_name)
        return url
    state.raise_for(s.schema_name)
    return url


def _schema_state(url: str, schema: str) -> SchemaState:
    from jobqueue.admin.revision import schema_state
    from jobqueue.db.connect import connect

    with connect(url, autocommit=True) as conn:
        return schema_state(conn, schema)


def _schema_state_asyncpg(url: str, schema: str) -> SchemaState:
    from jobqueue.admin.revision import aschema_state
    from jobqueue.db.reader import reading

    with reading(url) as r:
        return r.run(aschema_state(r.conn, schema))


def client(s: Settings | None = None) -> Client:
    """A Client on this invocation's settings, after the schema check."""
    from jobqueue.client.sync import Client

    s = s or settings()
    return Client(ensure_schema(s), settings=s)


def import_task_modules(modules: list[str]) -> None:
    """Import the modules that register task types (--import, JOBQ_IMPORTS), from the current
    directory too, as `python -m` would: `jobq worker --import mytasks` next to mytasks.py works."""
    import os
    import sys

    from jobqueue import registry

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    registry.import_modules([*modules, *settings().imports])

