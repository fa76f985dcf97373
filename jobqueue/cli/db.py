"""Schema and server commands: `jobq migrate` and `jobq db status|start|stop|url`."""

from __future__ import annotations

from typing import Annotated

import typer

from jobqueue.cli.app import database_url, out, settings

db_app = typer.Typer(help="The embedded PostgreSQL server (used when JOBQ_DATABASE_URL is not set).",
                     no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""
    app.command()(migrate)
    for name, command in (("status", db_status), ("start", db_start), ("stop", db_stop), ("url", db_url)):
        db_app.command(name)(command)
    app.add_typer(db_app, name="db")


def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Create or upgrade jobq's schema (safe to run from many processes at once)."""
    from rich.markup import escape

    from jobqueue.admin.migrate import current
    from jobqueue.admin.migrate import migrate as run

    s = settings()
    url = database_url(s)
    run(url, s.schema_name, revision=revision)
    out.print(f"schema [bold]{escape(s.schema_name)}[/] at revision {escape(str(current(url, s.schema_name)))}")


def db_status() -> None:
    """Is the embedded server running, where, and on which URL."""
    from jobqueue.admin import embedded
    from jobqueue.db.connect import redact

    s = settings()
    info = embedded.read_running(embedded.pgdata_dir(s.home))
    if s.database_url:
        out.print(f"JOBQ_DATABASE_URL is set ({redact(s.database_url)}): the embedded server is not used",
                  markup=False)
    if info is None:
        out.print(f"embedded server: stopped (data dir {embedded.pgdata_dir(s.home)})", markup=False)
        raise typer.Exit(3)
    out.print(f"embedded server: running, pid {info.pid}, data dir {info.pgdata}\nurl: {info.url()}", markup=False)


def db_start() -> None:
    """Start the embedded server (creating it on first use) and migrate it."""
    from jobqueue.admin import embedded
    from jobqueue.admin.migrate import migrate as run

    s = settings()
    info = embedded.ensure_running(s.home)
    run(info.url(), s.schema_name)
    out.print(f"embedded server running, pid {info.pid}\nurl: {info.url()}", markup=False)


def db_stop() -> None:
    """Stop the embedded server."""
    from jobqueue.admin import embedded

    stopped = embedded.stop(settings().home)
    out.print("stopped" if stopped else "not running")


def db_url(
    show_password: Annotated[bool, typer.Option("--show-password", help="Print the password too, not ***.")] = False,
) -> None:
    """Print the URL jobq uses (starting the embedded server if needed): `psql "$(jobq db url)"`.

    It is the libpq form (no SQLAlchemy driver suffix), so psql and psycopg take it as printed. The
    embedded server needs no password; a configured server's password is masked unless asked for,
    and the mask is said on stderr so that `$(jobq db url)` still captures the URL alone.
    """
    from jobqueue.cli.app import err
    from jobqueue.db.connect import redact

    url = database_url()
    shown = url if show_password else redact(url)
    print(shown)
    if shown != url:
        err.print("(password masked: add --show-password for a URL psql can use)", markup=False, highlight=False)
