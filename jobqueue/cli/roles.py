"""`jobq roles`: the command over jobqueue.admin.roles (what each role may do is decided there)."""

from __future__ import annotations

import os
import re
from typing import Annotated

import typer

from jobqueue.admin.roles import KINDS, apply, password_env, statements


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""

    @app.command()
    def roles(
        password_from_env: Annotated[
            bool,
            typer.Option(
                "--password-from-env",
                help="Let a role log in with the password in JOBQ_DASHBOARD_PASSWORD, JOBQ_PRODUCER_PASSWORD "
                "or JOBQ_WORKER_PASSWORD (roles whose variable is unset stay as they are).",
            ),
        ] = False,
        prefix: Annotated[
            str | None,
            typer.Option(
                help="Role name prefix (default: the schema name, giving jobq_dashboard etc.)."
            ),
        ] = None,
        print_sql: Annotated[
            bool,
            typer.Option(
                "--print-sql", help="Print the statements instead of running them (passwords elided)."
            ),
        ] = False,
    ) -> None:
        """Create the jobq_dashboard (read-only), jobq_producer and jobq_worker roles and grant them."""
        from jobqueue.cli.app import ensure_schema, fail, out
        from jobqueue.cli.app import settings as cli_settings
        from jobqueue.db.connect import connect

        settings = cli_settings()
        prefix = prefix or settings.schema_name
        if not re.match(r"^[a-z_][a-z0-9_]{0,40}$", prefix):
            fail(f"--prefix must be a lower-case SQL identifier, got {prefix!r}")
        passwords: dict[str, str] = {}
        if password_from_env:
            passwords = {k: os.environ[password_env(k)] for k in KINDS if os.environ.get(password_env(k))}
            if not passwords:
                fail("--password-from-env: none of " + ", ".join(password_env(k) for k in KINDS) + " is set")
        with connect(ensure_schema(settings), autocommit=True) as conn:
            if print_sql:
                for stmt in statements(conn, settings.schema_name, prefix, passwords, show_passwords=False):
                    print(stmt + ";")
                return
            names = apply(conn, settings.schema_name, prefix, passwords)
        for kind, name in zip(KINDS, names, strict=True):
            login = "login with password" if kind in passwords else "group role (NOLOGIN unless set before)"
            out.print(f"{name}: {login}")
