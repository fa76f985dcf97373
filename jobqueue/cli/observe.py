"""Observation commands: top, stats, exporter, prune.

They only read the views of migration 0003 (prune excepted), so a read-only role
(``jobq roles`` creates jobq_dashboard) is enough to run top, stats and the exporter.
"""

from __future__ import annotations

import re
from typing import Annotated

import typer

from jobqueue.cli.app import ensure_schema, fail, out, settings
from jobqueue.states import TERMINAL

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""
    for command in (top, stats, exporter, prune):
        app.command()(command)


def parse_duration(text: str) -> float:
    """'3d' -> seconds. Units s, m, h, d, w; one number and one unit, so '3d' cannot mean 3 minutes."""
    m = _DURATION.match(text)
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 12h, 3d or 2w")
    return float(m.group(1)) * _UNIT[m.group(2)]


def top(
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
) -> None:
    """Live dashboard of queues, throughput, latency, workers and failures (q or Ctrl-C quits)."""
    from jobqueue.cli.top import run_top

    if interval <= 0:
        fail("--interval must be positive")
    s = settings()
    raise typer.Exit(run_top(ensure_schema(s), s.schema_name, interval=interval))


def stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    width: Annotated[int | None, typer.Option(help="Text width (default: the terminal's).")] = None,
) -> None:
    """The numbers of `jobq top`, once: for scripts (--json) or a quick look."""
    import json

    from jobqueue.db.connect import connect
    from jobqueue.observe.snapshot import fetch

    s = settings()
    with connect(ensure_schema(s), autocommit=True) as conn:
        snap = fetch(conn, s.schema_name)
    if as_json:
        print(json.dumps(snap.to_json(), indent=2))
        return
    from rich.console import Console

    from jobqueue.cli.top import render

    console = Console(width=width) if width else out
    console.print(render(snap, width=console.width))


def exporter(
    port: Annotated[int, typer.Option(help="Port to serve /metrics on.")] = 9188,
    addr: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
) -> None:
    """Serve cluster-wide Prometheus metrics read from the views (run one per cluster)."""
    from jobqueue.observe.exporter import serve

    s = settings()
    raise typer.Exit(serve(ensure_schema(s), s.schema_name, port, addr))


def prune(
    older_than: Annotated[
        str | None,
        typer.Option(
            help="Delete finished tasks older than this (90s, 30m, 12h, 3d, 2w). Default: the retention "
            "settings (JOBQ_KEEP_DONE_DAYS for done/cancelled, JOBQ_KEEP_FAILED_DAYS for failed)."
        ),
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option("--status", "-s", help="done, failed or cancelled (repeatable; default all three)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would be deleted; delete nothing.")] = False,
    batch: Annotated[int, typer.Option(help="Rows per delete statement (one short transaction each).")] = 1000,
) -> None:
    """Delete finished tasks now, in small batches that never block claims. Chunks are kept."""
    import asyncio

    from jobqueue.db.connect import aconnect
    from jobqueue.runtime.maintenance.pruner import PrunePlan, default_plans
    from jobqueue.runtime.maintenance.pruner import prune as run_prune

    finished = [str(t) for t in TERMINAL]
    statuses = tuple(dict.fromkeys(status or finished))
    for st in statuses:
        if st not in finished:
            fail(f"--status {st!r}: only finished tasks can be pruned ({', '.join(finished)})")
    if batch < 1:
        fail("--batch must be at least 1")
    s = settings()
    if older_than is not None:
        try:
            plans = [PrunePlan(statuses, parse_duration(older_than))]
        except typer.BadParameter as exc:
            fail(f"--older-than: {exc}")
    else:
        plans = [
            PrunePlan(tuple(st for st in p.statuses if st in statuses), p.older_than_seconds)
            for p in default_plans(s)
        ]
        plans = [p for p in plans if p.statuses]
    url = ensure_schema(s)

    async def go() -> tuple[int, int]:
        conn = await aconnect(url)
        try:
            result = await run_prune(conn, s.schema_name, plans, batch=batch, dry_run=dry_run)
        finally:
            await conn.close()
        return result.rows, result.batches

    rows, batches = asyncio.run(go())
    what = ", ".join(statuses)
    if dry_run:
        out.print(f"would delete {rows} finished task(s) ({what})")
    else:
        out.print(f"deleted {rows} finished task(s) ({what}) in {batches} batch(es)")
