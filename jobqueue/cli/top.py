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


# Below this width the headers take their short forms and the workers panel leaves out host and pid
# (the default worker id is host:pid:random already), so every column keeps its numbers whole.
_NARROW = 120
_SHORT = {
    "runnable": "ready", "scheduled": "sched", "waiting": "wait", "running": "run", "oldest wait": "oldest",
    "done 1h": "done", "failed 1h": "fail", "cancelled 1h": "canc", "cancelled": "canc", "retried": "retry",
    "per min": "/min", "heartbeat": "beat", "failed": "fail", "expired": "exp", "last seen": "seen",
    "window": "win", "wait_p50": "w50", "wait_p95": "w95", "wait_p99": "w99", "run_p50": "r50", "run_p95": "r95",
    "run_p99": "r99",
}  # fmt: skip
# Names (types, worker ids, errors) give way first when a narrow terminal has no room.
_NAMES = ("type", "key", "schedule", "worker", "host", "types", "error")

Row = list[Text]


def _table(columns: tuple[str, ...], rows: list[Row], *, right: tuple[str, ...] = (), narrow: bool = False,
           limit: int | None = None, empty: str = "") -> Table:
    """A panel's table, one line per row, cut to ``limit`` rows (the panel's title says so)."""
    t = Table(expand=True, box=None, header_style="bold", padding=(0, 1), collapse_padding=True, pad_edge=False)
    for col in columns:
        label = _SHORT.get(col, col) if narrow else col
        if col == "error":
            t.add_column(label, no_wrap=True, overflow="ellipsis", ratio=1)
        elif col in _NAMES:
            t.add_column(label, no_wrap=True, overflow="ellipsis", max_width=16 if narrow else None)
        else:
            t.add_column(label, no_wrap=True, justify="right" if col in right else "left")
    if not rows:
        rows = [[Text(empty, style="dim")]]
    for row in rows[:limit]:
        t.add_row(*row, *[""] * (len(columns) - len(row)))
    return t


def _count(n: int, style: str) -> Text:
    """A count, coloured only when it is not zero."""
    return Text(str(n), style=style if n else "")


def _queues(s: Snapshot) -> list[Row]:
    rows: list[Row] = []
    for q in s.queues:
        name = _text(q.type)
        held = [w for w, on in (("paused", q.paused), (f"cap {q.max_running}", q.max_running is not None),
                                ("no worker", q.unserved)) if on]
        if held:
            name.append(f" ({', '.join(held)})", style="red" if q.unserved else "yellow")
        wait_style = "red" if q.oldest_wait_seconds > 300 else "yellow" if q.oldest_wait_seconds > 30 else ""
        rows.append([name, _text(q.runnable), _text(q.scheduled), _text(q.waiting), _text(q.running, "cyan"),
                     Text(_secs(q.oldest_wait_seconds) if q.runnable else "-", style=wait_style),
                     _text(q.done_last_hour, "green"), _count(q.failed_last_hour, "red"), _text(q.cancelled_last_hour)])
    return rows


def _throughput(s: Snapshot, minutes: int) -> list[Row]:
    rows: list[Row] = []
    totals = [0] * minutes
    for ttype, series in sorted(s.throughput.items()):
        per_minute = [int(r["done"]) + int(r["failed"]) + int(r["cancelled"]) for r in series]
        shown = per_minute[-minutes:]
        totals = [a + b for a, b in zip(totals, [0] * (minutes - len(shown)) + shown, strict=True)]
        sums = {k: sum(int(r[k]) for r in series) for k in ("done", "failed", "cancelled", "retried")}
        last_full = per_minute[-2] if len(per_minute) > 1 else 0
        rows.append([_text(ttype), _text(sparkline(shown)), _text(sums["done"], "green"), _text(sums["failed"]),
                     _text(sums["cancelled"]), _text(sums["retried"]), _text(last_full)])
    if len(s.throughput) > 1:
        rows.append([Text("all", style="bold"), _text(sparkline(totals)), *[Text()] * 4, _text(totals[-2])])
    return rows


_PERCENTILES = ("wait_p50", "wait_p95", "wait_p99", "run_p50", "run_p95", "run_p99")


def _latency(s: Snapshot) -> list[Row]:
    return [[_text(r["type"]), _text(r["period"]), _text(r["tasks"]), *(_text(_secs(r[k])) for k in _PERCENTILES)]
            for r in s.latency if r["period"] != "24h"]


def _workers(s: Snapshot, narrow: bool) -> list[Row]:
    rows: list[Row] = []
    for w in s.workers:
        where = [] if narrow else [_text(w["host"]), _text(w["pid"])]
        rows.append([_text(w["worker_id"]), *where, _text(",".join(w["types"])),
                     _text(w["state"], WORKER_COLORS.get(w["state"], "white")),
                     _text(_secs(w["heartbeat_age_seconds"]) + " ago"), _text(w["running"]), _text(w["done"]),
                     _text(w["failed"]), _count(int(w["lease_expired"]), "red"), _count(int(w["abandoned"]), "yellow")])
    return rows


def _failures(s: Snapshot) -> list[Row]:
    return [[_text(r["type"]), _text(r["error"]), _count(int(r["failed"]), "red"), _text(r["retried"]),
             _text(_secs(max(0.0, (s.at - r["last_seen"]).total_seconds())) + " ago")] for r in s.failures[:8]]


def _flow(s: Snapshot) -> list[Row]:
    """Flow-controlled keys: what runs per key, and what a per-key limit or a rate holds back."""
    rows: list[Row] = []
    for r in s.flow:
        rate = f"{r['rate_used']}/{r['rate_n']} per {_secs(r['rate_secs'])}" if r["rate_n"] else "-"
        held = Text.assemble(str(r["held_back"]), (f" ({r['held_by']})", "yellow")) if r["held_by"] else Text("0")
        rows.append([_text(r["type"]), _text(r["key"] or "''"), _text(r["running"], "cyan"),
                     _text(r["max_per_key"] or "-"), _text(r["queued"]), held, _text(rate),
                     _text(_secs(r["wait_seconds"]) if r["wait_seconds"] is not None else "-")])
    return rows


def _schedules(s: Snapshot) -> list[Row]:
    rows: list[Row] = []
    for r in s.schedules:
        last = f"{r['last_task_id']} {r['last_task_status']}" if r["last_task_id"] is not None else "-"
        rows.append([_text(r["name"]), _text(r["type"]), _text(f"{r['cron']} ({r['tz']})"),
                     Text("paused", style="yellow") if r["paused"] else _text(_secs(r["next_in_seconds"])),
                     _text(last)])
    return rows


def _row_limits(sizes: list[int], lines: int) -> list[int]:
    """Share ``lines`` table rows among the panels: one each first, then in turn while any has more."""
    limits = [1] * len(sizes)
    left = lines - len(sizes)
    while left > 0 and any(lim < size for lim, size in zip(limits, sizes, strict=True)):
        for i, size in enumerate(sizes):
            if left > 0 and limits[i] < size:
                limits[i] += 1
                left -= 1
    return limits


def render(s: Snapshot, title: str = "jobq", *, live: bool = False, width: int | None = None,
           height: int | None = None) -> RenderableType:
    """One frame of `jobq top` (``live``: with the key to quit), fitted to ``width`` x ``height`` if given.

    A frame taller than the terminal loses its last panels, so with a height every panel gets rows
    in turn and a panel cut short says "(3 of 7)" in its title; a narrow width takes the short
    headers and a shorter sparkline before rich would have to cut numbers.
    """
    narrow = width is not None and width < _NARROW
    minutes = 60 if not narrow or width is None else max(10, min(60, width - 50))
    # Panel title, columns, right-aligned columns, rows, what an empty panel says.
    counts = ("runnable", "scheduled", "waiting", "running", "oldest wait", "done 1h", "failed 1h", "cancelled 1h")
    sums = ("done", "failed", "cancelled", "retried", "per min")
    numbers = ("tasks", *_PERCENTILES)
    workers = ("pid", "running", "done", "failed", "expired", "stuck")
    where = () if narrow else ("host", "pid")
    panels: list[tuple[str, tuple[str, ...], tuple[str, ...], list[Row], str]] = [
        ("queues" + (" (done, fail, canc: last hour)" if narrow else ""), ("type", *counts), counts, _queues(s),
         "no tasks queued, running or finished in the last hour"),
        ("throughput", ("type", f"last {minutes} min (finished per minute)", *sums), sums, _throughput(s, minutes),
         "nothing finished in the last hour"),
        ("latency (wait = run_at to start; run = handler time)", ("type", "window", *numbers), numbers,
         _latency(s), ""),
        # "stuck": sync handlers past their hard timeout whose threads have not returned; each holds
        # a slot, so a worker with stuck threads runs fewer tasks than its concurrency.
        ("workers", ("worker", *where, "types", "state", "heartbeat", "running", "done", "failed", "expired",
                     "stuck"), workers, _workers(s, narrow), "no workers"),
        ("failing types (24h)", ("type", "error", "failed", "retried", "last seen"), ("failed", "retried", "last seen"),
         _failures(s), "no failures in the last 24 hours"),
    ]
    if s.flow:  # the flow panel only when a type declares fair_by, limit_by or rate (issue 14)
        flow = ("running", "limit", "queued", "held back", "rate used", "wait")
        panels.insert(1, ("flow control (per key)", ("type", "key", *flow), flow, _flow(s), ""))
    if s.schedules:
        panels.append(("cron schedules", ("schedule", "type", "cron", "next in", "last task"), ("next in",),
                       _schedules(s), ""))
    # Each panel costs its two borders and a header line; the frame's own header takes one more.
    lines = None if height is None else height - 1 - 3 * len(panels)
    limits = ([None] * len(panels) if lines is None
              else _row_limits([max(1, len(p[3])) for p in panels], lines))
    header = Text.assemble((f"{title} ", "bold"), (s.at.strftime("%Y-%m-%d %H:%M:%S %Z"), "dim"),
                           ("   q to quit" if live else "", "dim"))
    return Group(header, *(
        Panel(_table(columns, rows, right=right, narrow=narrow, limit=limit, empty=empty), title_align="left",
              title=name + (f" ({limit} of {len(rows)})" if limit is not None and len(rows) > limit else ""))
        for (name, columns, right, rows, empty), limit in zip(panels, limits, strict=True)))


def render_text(s: Snapshot, width: int = 140, height: int | None = None, *, live: bool = False) -> str:
    """A frame as plain text: what a test (or a log) can look at."""
    console = Console(file=io.StringIO(), width=width, height=height, record=True, color_system=None,
                      force_terminal=False)
    console.print(render(s, live=live, width=width, height=height))
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
                    live.update(render(fetch(conn, schema), live=True, width=console.width, height=console.height),
                                refresh=True)
                    deadline = time.monotonic() + interval
                    while (left := deadline - time.monotonic()) > 0:
                        key = _wait_key(fd, left)
                        if key and any(k in key for k in ("q", "Q", "\x1b")):
                            return 0
        except KeyboardInterrupt:
            return 0
