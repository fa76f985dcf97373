"""`jobq worker`: run task handlers in this process."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from jobqueue.cli.app import ensure_schema, fail, out, settings


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""
    app.command()(worker)


def worker(
    types: Annotated[str, typer.Option("--types", "-t", help="Comma-separated task types to run.")],
    concurrency: Annotated[int | None, typer.Option(help="Tasks run at once by this process.")] = None,
    burst: Annotated[bool, typer.Option(help="Exit 0 once no task of these types is runnable.")] = False,
    name: Annotated[str | None, typer.Option(help="Worker id (default host:pid:random).")] = None,
    grace: Annotated[float | None, typer.Option(help="Seconds running tasks get after SIGTERM.")] = None,
    poll: Annotated[float | None, typer.Option(help="Fallback poll interval in seconds.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    isolation: Annotated[str, typer.Option(
        help="thread: sync handlers in threads (unless @task says process); process: every sync handler "
             "in a child process that a cancel or timeout kills (one task per child).")] = "thread",
    imports: Annotated[list[str] | None, typer.Option(
        "--import", "-i", help="Module that registers task types (repeatable; also JOBQ_IMPORTS).")] = None,
) -> None:
    """Run task handlers: `jobq worker --types dataflow,raptor`."""
    from jobqueue import registry
    from jobqueue.runtime.worker import run_worker

    s = settings()
    registry.import_modules([*(imports or []), *s.imports])
    wanted = [t.strip() for t in types.split(",") if t.strip()]
    if not wanted:
        fail("--types needs at least one task type")
    for t in wanted:
        registry.get_type(t)
    if isolation not in ("thread", "process"):
        fail("--isolation must be thread or process")
    if concurrency is not None and concurrency < 1:
        fail("--concurrency must be at least 1")
    url = ensure_schema(s)  # an unreachable database at start is one error line, not a retry loop
    if metrics_port is not None:
        from jobqueue.observe.metrics import serve

        serve(metrics_port)
    started = time.monotonic()
    code, stats = run_worker(wanted, concurrency=concurrency, burst=burst, name=name, grace_seconds=grace,
                             poll_seconds=poll, isolation=isolation, url=url, settings=s)
    out.print(f"worker stopped after {time.monotonic() - started:.1f}s: {stats.done} done, {stats.failed} failed, "
              f"{stats.retried} retried, {stats.cancelled} cancelled, {stats.rescued} rescued", highlight=False)
    raise typer.Exit(code)
