"""`jobq ui`: the web console and HTTP API (the jobq_console package, extra ``[ui]``), served by uvicorn.

The console is imported only here and only when the command runs: nothing else in jobq depends on it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from jobqueue.cli.app import ensure_schema, fail, out, settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""
    app.command()(ui)


def ui(
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs JOBQ_UI_TOKEN.")]
    = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
) -> None:
    """Serve the web console and the HTTP API (/api, OpenAPI at /api/openapi.json)."""
    try:
        import uvicorn

        from jobq_console import BindingRefused, ConsoleSettings, check_binding, create_app
    except ImportError as exc:
        fail(f"the web console needs its extra: pip install 'jobq[ui]' ({exc.name} is missing)")
    console = ConsoleSettings()
    try:
        check_binding(host, console)
    except BindingRefused as exc:
        fail(str(exc))
    if not 0 < port < 65536:
        fail(f"--port must be between 1 and 65535, got {port}")
    s = settings()
    app = create_app(ensure_schema(s), settings=s, console=console)
    out.print(f"jobq console on http://{host}:{port}/ (Ctrl-C stops)", highlight=False)
    # Open event streams never end by themselves: Ctrl-C closes them after a short grace.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
