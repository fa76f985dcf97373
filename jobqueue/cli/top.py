"""The terminal rendering of a snapshot (`jobq top`, `jobq stats`) and the live loop of `jobq top`.

Rendering is a pure function of an observe/snapshot.py Snapshot, so a frame can be rendered to a
string in a test without a terminal. Every string that came from the database (types, errors, worker
ids, hosts) is put in a :class:`~rich.text.Text`, never into markup: an error message holding ``[/]``
is shown as written instead of crashing the frame with a MarkupError (issue 11, item 19).
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from jobqueue.observe.snapshot import Snapshot, fetch

SPARKS = "▁▂▃▄▅▆▇█"
WORKER_COLORS = {"alive": "green", "stale": "red", "stopped": "dim"}


def sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(len(SPARKS) - 1, round(v / top * (len(SPARKS) - 1)))] for v in values)


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= n:
            return f"{value / n:.1f}{unit}"
    return f"{value:.1f}s"


def _text(value: object, style: str = "") -> Text:
    """A cell showing `value` literally, whatever brackets it holds."""
    return Text(str(value), style=style)


def _count(n: int, style: str) -> Text:
    """A count, coloured only when it is not zero."""
    return Text(str(n), style=style if n else "")


def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    t = Table(expand=True, box=None, header_style="bold")
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left")
    return t


def _empty(t: Table, message: str) -> None:
    t.add_row(Text(message, style="dim"), *[""] * (len(t.columns) - 1))


def _queues(s: Snapshot) -> Table:
    counts = ("runnable", "scheduled", "waiting", "running", "oldest wait", "done 1h", "failed 1h", "cancelled 1h")
    t = _table("type", *counts, right=counts)
    for q in s.queues:
        name = Text.assemble(q.type, (" (paused)", "yellow")) if q.paused else _text(q.type)
        wait_style = "red" if q.oldest_wait_seconds > 300 else "yellow" if q.oldest_wait_seconds > 30 else ""
        t.add_row(name, str(q.runnable), str(q.scheduled), str(q.waiting), _text(q.running, "cyan"),
                  Text(_secs(q.oldest_wait_seconds) if q.runnable else "-", style=wait_style),
                  _text(q.done_last_hour, "green"), _count(q.failed_last_hour, "red"), str(q.cancelled_last_hour))
    if not s.queues:
        _empty(t, "no tasks queued, running or finished in the last hour")
    return t


def _throughput(s: Snapshot) -> Table:
    counts = ("done", "failed", "cancelled", "retried", "per min")
    t = _table("type", "last 60 min (finished per minute)", *counts, right=counts)
    t.columns[1].no_wrap = True
    totals = [0] * 60
    for ttype, series in sorted(s.throughput.items()):
        per_minute = [int(r["done"]) + int(r["failed"]) + int(r["cancelled"]) for r in series]
        totals = [a + b for a, b in zip(totals, per_minute, strict=False)]
        sums = {k: sum(int(r[k]) for r in series) for k in ("done", "failed", "cancelled", "retried")}
        last_full = per_minute[-2] if len(per_minute) > 1 else 0
        t.add_row(_text(ttype), sparkline(per_minute), _text(sums["done"], "green"), str(sums["failed"]),
                  str(sums["cancelled"]), str(sums["retried"]), str(last_full))
    if len(s.throughput) > 1:
        t.add_row(Text("all", style="bold"), sparkline(totals), "", "", "", "", str(totals[-2]))
    if not s.throughput:
        _empty(t, "nothing finished in the last hour")
    return t


_PERCENTILES = ("wait_p50", "wait_p95", "wait_p99", "run_p50", "run_p95", "run_p99")


def _latency(s: Snapshot) -> Table:
    numbers = ("tasks", *(k.replace("_", " ") for k in _PERCENTILES))
    t = _table("type", "window", *numbers, right=numbers)
    for r in s.latency:
        if r["period"] != "24h":
            t.add_row(_text(r["type"]), _text(r["period"]), str(r["tasks"]), *(_secs(r[k]) for k in _PERCENTILES))
    return t


def _workers(s: Snapshot) -> Table:
    # "stuck": sync handlers past their hard timeout whose threads have not returned; each holds a
    # slot, so a worker with stuck threads runs fewer tasks than its concurrency.
    numbers = ("pid", "running", "done", "failed", "expired", "stuck")
    t = _table("worker", "host", "pid", "types", "state", "heartbeat", "running", "done", "failed", "expired",
               "stuck", right=numbers)
    for w in s.workers:
        t.add_row(_text(w["worker_id"]), _text(w["host"]), str(w["pid"]), _text(",".join(w["types"])),
                  _text(w["state"], WORKER_COLORS.get(w["state"], "white")),
                  _secs(w["heartbeat_age_seconds"]) + " ago", str(w["running"]), str(w["done"]),
                  str(w["failed"]), _count(int(w["lease_expired"]), "red"), _count(int(w["abandoned"]), "yellow"))
    if not s.workers:
        _empty(t, "no workers")
    return t


def _failures(s: Snapshot, limit: int = 8) -> Table:
    t = Table(expand=True, box=None, header_style="bold")
    t.add_column("type")
    t.add_column("error", overflow="ellipsis", no_wrap=True, ratio=1)
    for col in ("failed", "retried", "last seen"):
        t.add_column(col, justify="right")
    for r in s.failures[:limit]:
        age = (s.at - r["last_seen"]).total_seconds()
        t.add_row(_text(r["type"]), _text(r["error"]), _count(int(r["failed"]), "red"), str(r["retried"]),
                  _secs(max(0.0, age)) + " ago")
    if not s.failures:
        _empty(t, "no failures in the last 24 hours")
    return t


def _schedules(s: Snapshot) -> Table:
    t = _table("schedule", "type", "cron", "next in", "last task", right=("next in",))
    for r in s.schedules:
        last = f"{r['last_task_id']} {r['last_task_status']}" if r["last_task_id"] is not None else "-"
        t.add_row(_text(r["name"]), _text(r["type"]), _text(f"{r['cron']} ({r['tz']})"),
                  Text("paused", style="yellow") if r["paused"] else Text(_secs(r["next_in_seconds"])), _text(last))
    return t


def render(s: Snapshot, title: str = "jobq") -> RenderableType:
    """One frame of `jobq top`."""
    header = Text.assemble(
        (f"{title} ", "bold"), (s.at.strftime("%Y-%m-%d %H:%M:%S %Z"), "dim"), ("   q to quit", "dim")
    )
    return Group(
        header,
        Panel(_queues(s), title="queues", title_align="left"),
        Panel(_throughput(s), title="throughput", title_align="left"),
        Panel(_latency(s), title="latency (wait = run_at to start; run = handler time)", title_align="left"),
        Panel(_workers(s), title="workers", title_align="left"),
        Panel(_failures(s), title="failing types (24h)", title_align="left"),
        *([Panel(_schedules(s), title="cron schedules", title_align="left")] if s.schedules else []),
    )


def render_text(s: Snapshot, width: int = 140) -> str:
    """A frame as plain text: what a test (or a log) can look at."""
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None, force_terminal=False)
    console.print(render(s))
    return console.export_text()


# ---------------------------------------------------------------- the live loop


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """Put a terminal stdin in cbreak mode (single keys, Ctrl-C still a signal) and restore it."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_key(fd: int | None, timeout: float) -> str | None:
    if fd is None:
        time.sleep(timeout)
        return None
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return None
    data = os.read(fd, 32)
    return data.decode(errors="ignore") if data else "q"


def run_top(url: str, schema: str, *, interval: float = 1.0, console: Console | None = None) -> int:
    """Full-screen dashboard refreshed every `interval` seconds until q, Q, Esc or Ctrl-C."""
    from rich.live import Live

    from jobqueue.db.connect import connect

    console = console or Console()
    with connect(url, autocommit=True, application_name="jobq top") as conn:
        try:
            with _keys() as fd, Live(console=console, screen=True, auto_refresh=False) as live:
                while True:
                    live.update(render(fetch(conn, schema)), refresh=True)
                    deadline = time.monotonic() + interval
                    while (left := deadline - time.monotonic()) > 0:
                        key = _wait_key(fd, left)
                        if key and any(k in key for k in ("q", "Q", "\x1b")):
                            return 0
        except KeyboardInterrupt:
            return 0
