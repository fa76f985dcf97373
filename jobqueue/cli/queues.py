"""Queue control: `jobq queue ls | pause TYPE | resume TYPE | cap TYPE N | uncap TYPE`.

A queue is a task type. Pausing or capping one writes the `queues` table, which every claim reads:
the change holds from the next claim and leaves running tasks alone. Only the schema owner (or a
superuser) may write it; the jobq_* roles are refused (docs/roles.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from jobqueue.cli.app import client, out

if TYPE_CHECKING:
    from jobqueue.models import QueueState

queue_app = typer.Typer(help="Pause, resume, cap and list queues (one per task type).", no_args_is_help=True)
TypeArg = Annotated[str, typer.Argument(help="Task type (the queue).", show_default=False)]


def register(app: typer.Typer) -> None:
    """Add `jobq queue ...` to the `jobq` app."""
    for command in (ls, pause, resume, cap, uncap):
        queue_app.command()(command)
    app.add_typer(queue_app, name="queue")


def flags(q: QueueState) -> list[str]:
    """What holds a queue back, in words: paused, its cap, or no live worker for its queued tasks."""
    words = ["paused"] if q.paused else []
    if q.max_running is not None:
        words.append(f"cap {q.max_running}")
    if q.queued and not q.served:
        words.append("no worker")
    return words


def notes(queues: Iterable[Mapping[str, Any]], types: set[str]) -> list[str]:
    """One line per type of `types` whose queued tasks will not start as things are. `queues` are rows
    of client.sql's `queues` (`jobq ls` reads them without building QueueState models)."""
    lines = []
    for q in queues:
        if q["type"] not in types:
            continue
        if q["paused"]:
            lines.append(f"note: queue {q['type']} is paused (jobq queue resume {q['type']})")
        if q["queued"] and not q["workers"]:
            lines.append(f"note: {q['queued']} queued task(s) of type {q['type']}: no live worker serves it")
    return lines


def ls() -> None:
    """Every queue known anywhere (paused or capped, with live tasks, or served by a live worker)."""
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("type", "state", "queued", "runnable", "waiting", "running", "cap", "workers"):
        table.add_column(col, justify="left" if col in ("type", "state") else "right")
    for q in client().queues():
        state = ", ".join(flags(q)) or "active"
        style = "red" if "no worker" in state else "yellow" if q.paused else ""
        table.add_row(Text(q.type), Text(state, style=style), str(q.queued), str(q.runnable), str(q.waiting),
                      str(q.running), "-" if q.max_running is None else str(q.max_running), str(q.workers))
    if not table.rows:
        out.print("no queues: nothing paused, capped, live or served")
        return
    out.print(table)


def pause(type: TypeArg) -> None:
    """Stop claiming TYPE (from the next claim on); running tasks carry on."""
    client().pause(type)
    out.print(f"{type}: paused", highlight=False)


def resume(type: TypeArg) -> None:
    """Claim TYPE again; its workers are woken at once."""
    client().resume(type)
    out.print(f"{type}: resumed", highlight=False)


def cap(type: TypeArg, n: Annotated[int, typer.Argument(help="Most tasks of TYPE running at once, cluster-wide.",
                                                        show_default=False)]) -> None:
    """At most N tasks of TYPE running across all workers."""
    client().cap(type, n)
    out.print(f"{type}: at most {n} running", highlight=False)


def uncap(type: TypeArg) -> None:
    """Remove TYPE's cluster-wide cap."""
    client().uncap(type)
    out.print(f"{type}: no cap", highlight=False)
