"""The ``jobq`` command line: the only layer where typer and rich live.

``app`` (the base module) defines the Typer app and the helpers every command uses and imports no
command module. Every command module has one ``register(app)``; this package calls them, in the order
the commands appear in ``jobq --help``, and runs the app.

A command module is imported only when it is needed: `jobq ls` imports the task commands and not the
cron, roles, observe or document ones (start-up is measured by ``python -m bench startup``). The
command word is read from argv past the global options; help, a typo, or anything not recognised
registers every module, so `jobq --help` and click's "did you mean" see every command as before.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module
from typing import Any

from jobqueue.cli.app import app, error_line

# Each command module and the top-level command words it adds, in `jobq --help` order.
COMMANDS: dict[str, tuple[str, ...]] = {
    "tasks": ("enqueue", "status", "ls", "cancel", "retry", "prioritize"),
    "queues": ("queue",),
    "worker": ("worker",),
    "cron": ("cron",),
    "db": ("migrate", "db"),
    "observe": ("top", "stats", "exporter", "prune"),
    "documents": ("watch", "docs"),
    "roles": ("roles",),
    "ui": ("ui",),
}
ORDER = {name: i for i, name in enumerate(COMMANDS)}
# The global options (app.py's callback) that take a value.
_VALUED = ("--database-url",)
_registered: set[str] = set()


def command_word(argv: Sequence[str]) -> str | None:
    """The first word of argv that is not a global option or its value: the command asked for."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def module_of(info: Any) -> str:
    """The command module a registered command (CommandInfo) or group (TyperInfo) came from."""
    callback = info.callback or info.typer_instance.registered_commands[0].callback
    return str(callback.__module__).rsplit(".", 1)[-1]


def register(argv: Sequence[str] | None = None) -> None:
    """Register the module that owns argv's command, or every module; each at most once per process.

    Commands stay in `jobq --help` order whatever was registered first (main() may run several times
    in one process: the tests do)."""
    word = command_word(sys.argv[1:] if argv is None else argv)
    wanted = [m for m, words in COMMANDS.items() if word in words] or list(COMMANDS)
    for name in wanted:
        if name not in _registered:
            import_module(f"jobqueue.cli.{name}").register(app)
            _registered.add(name)
    app.registered_commands.sort(key=lambda info: ORDER[module_of(info)])
    app.registered_groups.sort(key=lambda info: ORDER[module_of(info)])


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning every error into one line and an exit code."""
    from jobqueue.errors import JobqError

    register(argv)
    try:
        app(args=argv, standalone_mode=True, prog_name="jobq")
    except JobqError as exc:
        error_line(str(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        error_line(str(exc))
        sys.exit(1)
    except Exception as exc:
        if not _is_psycopg_error(exc):
            raise
        error_line(f"database: {str(exc).strip().splitlines()[0]}")
        sys.exit(1)


def _is_psycopg_error(exc: BaseException) -> bool:
    """A psycopg error, without importing psycopg: a command that never loaded it (the worker) cannot
    have raised one."""
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)


__all__ = ["app", "main", "register"]
