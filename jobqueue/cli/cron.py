"""`jobq cron ls|add|pause|resume|rm`: the schedules table, changed at run time without a deploy.

Schedules declared in code (``@task(cron=...)``) are written by the workers at start; those added here
live in the table alone. Removing a code-declared schedule lasts until a worker serving its type
starts again: pause it instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from jobqueue.cli.app import ensure_schema, out, settings

if TYPE_CHECKING:
    from jobqueue.cron import Schedules

cron_app = typer.Typer(help="Periodic tasks: list, add, pause, resume and remove cron schedules.",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `jobq` app."""
    for name, command in (("ls", ls), ("add", add), ("pause", pause), ("resume", resume), ("rm", rm)):
        cron_app.command(name)(command)
    app.add_typer(cron_app, name="cron")


@contextmanager
def _schedules() -> Iterator[Schedules]:
    from jobqueue.cron import Schedules
    from jobqueue.db.connect import connect

    s = settings()
    with connect(ensure_schema(s), autocommit=True) as conn:
        yield Schedules(conn, s.schema_name)


def ls() -> None:
    """The schedules, their next tick and the last task each fired."""
    from rich.table import Table
    from rich.text import Text

    with _schedules() as sch:
        rows = sch.list()
    table = Table(title=f"{len(rows)} schedule(s)")
    for col in ("name", "type", "cron", "tz", "state", "next tick (UTC)", "last task", "source"):
        table.add_column(col)
    for r in rows:
        last = f"{r.last_task_id} {r.last_task_status}" if r.last_task_id is not None else "-"
        table.add_row(Text(r.name), Text(r.type), Text(r.cron), Text(r.tz),
                      Text("paused", style="yellow") if r.paused else Text("active", style="green"),
                      r.next_tick.strftime("%Y-%m-%d %H:%M:%S"), Text(last), r.source)
    out.print(table)


def add(
    name: Annotated[str, typer.Argument(help="Schedule name.")],
    type: Annotated[str, typer.Option("--type", "-t", help="Task type to enqueue at each tick.")],
    cron: Annotated[str, typer.Option(help="Cron expression, e.g. '*/5 * * * *'.")],
    tz: Annotated[str, typer.Option(help="IANA time zone the expression is read in.")] = "UTC",
    payload: Annotated[str, typer.Option("--payload", "-p", help="JSON payload of each task.")] = "{}",
    priority: Annotated[int, typer.Option(help="Priority of each task.")] = 0,
    max_retries: Annotated[int | None, typer.Option(help="Retries of each task.")] = None,
    backfill: Annotated[int | None, typer.Option(help="Missed ticks to catch up after an outage (default 1).")]
    = None,
    replace: Annotated[bool, typer.Option(help="Change the schedule of this name if it exists.")] = False,
) -> None:
    """Add a schedule (refused, with the reason, if its expression or time zone is bad)."""
    import contextlib
    import json

    from jobqueue import registry
    from jobqueue.cli.tasks import _parse_payload
    from jobqueue.client.encode import encode_payload
    from jobqueue.errors import UnknownTaskType

    registry.check_schedule(name, type, cron, tz, backfill)
    data = _parse_payload(payload)
    with contextlib.suppress(UnknownTaskType):  # a type known here is checked now; another goes as given
        data = json.loads(encode_payload(type, data, settings()))
    with _schedules() as sch:
        s = sch.add(name, type, cron, tz=tz, payload=data, priority=priority, max_retries=max_retries,
                    backfill=backfill, replace=replace)
    out.print(f"{s.name}: next tick {s.next_tick.isoformat()}", highlight=False)


def pause(name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Stop firing a schedule (its ticks while paused are not caught up)."""
    with _schedules() as sch:
        sch.set_paused(name, True)
    out.print(f"{name}: paused", highlight=False)


def resume(name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Fire a paused schedule again, from its next tick on."""
    with _schedules() as sch:
        sch.set_paused(name, False)
    out.print(f"{name}: resumed", highlight=False)


def rm(name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Remove a schedule (a code-declared one returns when a worker of its type starts: pause it instead)."""
    with _schedules() as sch:
        sch.remove(name)
    out.print(f"{name}: removed", highlight=False)
