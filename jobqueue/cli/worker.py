"""`jobq worker`: run task handlers in this process.

The worker talks: one line when it starts (what it runs, where), one at once on the first Ctrl-C
(draining: what still runs and the grace left), one on the second (what it abandons), and the summary
line however it ends. The runtime reports through ``Worker(on_status=...)``; the lines are drawn here.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

from jobqueue.cli.app import ensure_schema, fail, import_task_modules, out, settings

if TYPE_CHECKING:
    from jobqueue.runtime.worker import WorkerStats, WorkerStatus


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""
    app.command()(worker)


def worker(
    types: Annotated[str, typer.Option("--types", "-t", help="Comma-separated task types to run.")],
    concurrency: Annotated[int | None, typer.Option(help="Tasks run at once by this process.")] = None,
    prefetch: Annotated[int | None, typer.Option(
        help="Most tasks claimed ahead of free slots, for handlers shorter than a claim (0: none).")] = None,
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
    import_task_modules(imports or [])
    wanted = [t.strip() for t in types.split(",") if t.strip()]
    if not wanted:
        fail("--types needs at least one task type")
    for t in wanted:
        registry.get_type(t)
    if isolation not in ("thread", "process"):
        fail("--isolation must be thread or process")
    if concurrency is not None and concurrency < 1:
        fail("--concurrency must be at least 1")
    if prefetch is not None and prefetch < 0:
        fail("--prefetch must be 0 or more")
    # An unreachable database at start is one error line, not a retry loop; checked on asyncpg like the
    # runtime, so the worker does not import psycopg.
    url = ensure_schema(s, asyncpg=True)
    if metrics_port is not None:
        from jobqueue.observe.metrics import serve

        serve(metrics_port)
    started = time.monotonic()

    def on_status(st: WorkerStatus) -> None:
        say(describe(st, time.monotonic() - started, burst=burst))
        if st.event == "abandoning":  # the process exits right after this returns
            say(summary(st.stats, time.monotonic() - started))

    code, stats = run_worker(wanted, concurrency=concurrency, prefetch=prefetch, burst=burst, name=name,
                             grace_seconds=grace, poll_seconds=poll, isolation=isolation, url=url, settings=s,
                             on_status=on_status)
    say(summary(stats, time.monotonic() - started))
    raise typer.Exit(code)


def say(line: str) -> None:
    """One line, at once (stdout may be a pipe to a supervisor's log)."""
    out.print(line, highlight=False, markup=False, soft_wrap=True)
    sys.stdout.flush()


def _ids(ids: tuple[int, ...]) -> str:
    return ", ".join(map(str, ids[:10])) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")


def describe(st: WorkerStatus, elapsed: float, *, burst: bool = False) -> str:
    """The line for one status report of the worker."""
    if st.event == "started":
        until = "until nothing is runnable" if burst else "Ctrl-C to stop"
        return (f"worker {st.worker_id} started: types {','.join(st.types)}, concurrency {st.concurrency}, "
                f"database {st.database} ({until})")
    if st.event == "draining":
        if not st.running:
            return "stopping: no task running"
        return (f"draining: {len(st.running)} task(s) still running ({_ids(st.running)}), "
                f"{st.grace_left:.0f}s of grace left before they are released; Ctrl-C again to abandon them")
    if not st.running:
        return "exiting at once: no task was running"
    return (f"exiting at once after {elapsed:.1f}s: abandoning {len(st.running)} task(s) ({_ids(st.running)}); "
            "their leases expire and the rescuer puts them back in the queue")


def summary(stats: WorkerStats, elapsed: float) -> str:
    return (f"worker stopped after {elapsed:.1f}s: {stats.done} done, {stats.failed} failed, "
            f"{stats.retried} retried, {stats.cancelled} cancelled, {stats.rescued} rescued")
