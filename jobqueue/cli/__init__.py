"""The ``jobq`` command line: the only layer where typer and rich live.

``app`` (the base module) defines the Typer app and the helpers every command uses and imports no
command module. Every command module has one ``register(app)``; this package calls each of them, in
the order the commands appear in ``jobq --help``, and runs the app.
"""

from __future__ import annotations

import sys

from jobqueue.cli import cron, db, documents, observe, queues, roles, tasks, ui, worker
from jobqueue.cli.app import app, error_line

for _module in (tasks, queues, worker, cron, db, observe, documents, roles, ui):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning every error into one line and an exit code."""
    import psycopg

    from jobqueue.errors import JobqError

    try:
        app(args=argv, standalone_mode=True, prog_name="jobq")
    except JobqError as exc:
        error_line(str(exc))
        sys.exit(1)
    except psycopg.Error as exc:
        error_line(f"database: {str(exc).strip().splitlines()[0]}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        error_line(str(exc))
        sys.exit(1)


__all__ = ["app", "main"]
