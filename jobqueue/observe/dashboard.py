"""`jobq top` and `jobq stats`: the observation views (migration 0003) read once, or every second.

Everything shown comes from the views, never from ad-hoc queries of the tasks table, so the terminal,
Grafana and the exporter agree and share the views' cheap plans. A snapshot is plain data (what
`jobq stats --json` prints); rendering is a pure function of it, so a frame can be rendered to a
string in a test without a terminal.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

SPARKS = "▁▂▃▄▅▆▇█"
# Stopped workers stay in the panel this long, so a crash or a rolling restart remains visible.
STOPPED_VISIBLE_SECONDS = 3600


@dataclass
class QueueRow:
    type: str
    queued: int = 0
    runnable: int = 0
    scheduled: int = 0
    waiting: int = 0
    running: int = 0
    done_last_hour: int = 0
    failed_last_hour: int = 0
    cancelled_last_hour: int = 0
    oldest_wait_seconds: float = 0.0
    paused: bool = False
    priorities: list[int] = field(default_factory=list)


@dataclass
class Snapshot:
    at: datetime
    queues: list[QueueRow]
    # type -> per-minute rows (oldest first): minute, done, failed, cancelled, retried
    throughput: dict[str, list[dict[str, Any]]]
    latency: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    failures: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: datetimes as ISO 8601, numbers as numbers."""
        return _jsonable(asdict(self))  # type: ignore[no-any-return]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def fetch(conn: psycopg.Connection[Any], schema: str = "jobq") -> Snapshot:
    """Read every view once, in one read-only snapshot so the panels agree with each other."""
    cur = conn.cursor(row_factory=dict_row)
    with conn.transaction():
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        now_row = cur.execute("SELECT now() AS now").fetchone()
        assert now_row is not None
        depth = cur.execute(f"SELECT * FROM {schema}.queue_depth ORDER BY type, priority DESC").fetchall()
        thr = cur.execute(f"SELECT * FROM {schema}.throughput ORDER BY type, minute").fetchall()
        lat = cur.execute(f"SELECT * FROM {schema}.latency ORDER BY type, period_seconds").fetchall()
        workers = cur.execute(
            f"SELECT * FROM {schema}.worker_health WHERE stopped_at IS NULL "
            f"OR stopped_at > now() - make_interval(secs => %s) ORDER BY state, worker_id",
            (STOPPED_VISIBLE_SECONDS,),
        ).fetchall()
        failures = cur.execute(
            "SELECT type, error, failed, retried, tasks, first_seen, last_seen, latest_task_id, "
            f"latest_message "
            f"FROM {schema}.failures ORDER BY last_seen DESC LIMIT 20"
        ).fetchall()
    queues: dict[str, QueueRow] = {}
    for r in depth:
        q = queues.setdefault(r["type"], QueueRow(type=r["type"]))
        for name in (
            "queued",
            "runnable",
            "scheduled",
            "waiting",
            "running",
            "done_last_hour",
            "failed_last_hour",
            "cancelled_last_hour",
        ):
            setattr(q, name, getattr(q, name) + int(r[name]))
        q.oldest_wait_seconds = max(q.oldest_wait_seconds, float(r["oldest_wait_seconds"]))
        q.paused = q.paused or bool(r["paused"])
        q.priorities.append(int(r["priority"]))
    throughput: dict[str, list[dict[str, Any]]] = {}
    for r in thr:
        throughput.setdefault(r.pop("type"), []).append(r)
    return Snapshot(
        at=now_row["now"],
        queues=list(queues.values()),
        throughput=throughput,
        latency=[dict(r) for r in lat],
        workers=[dict(r) for r in workers],
        failures=[dict(r) for r in failures],
    )


# ---------------------------------------------------------------- rendering


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


def _queues(s: Snapshot) -> Table:
    t = Table(expand=True, box=None, header_style="bold")
    for col in (
        "type",
        "runnable",
        "scheduled",
        "waiting",
        "running",
        "oldest wait",
        "done 1h",
        "failed 1h",
        "cancelled 1h",
    ):
        t.add_column(col, justify="left" if col == "type" else "right")
    for q in s.queues:
        name = f"{q.type} [yellow](paused)[/]" if q.paused else q.type
        wait_style = "red" if q.oldest_wait_seconds > 300 else "yellow" if q.oldest_wait_seconds > 30 else ""
        t.add_row(
            name,
            str(q.runnable),
            str(q.scheduled),
            str(q.waiting),
            f"[cyan]{q.running}[/]",
            Text(_secs(q.oldest_wait_seconds) if q.runnable else "-", style=wait_style),
            f"[green]{q.done_last_hour}[/]",
            f"[red]{q.failed_last_hour}[/]" if q.failed_last_hour else "0",
            str(q.cancelled_last_hour),
        )
    if not s.queues:
        t.add_row("[dim]no tasks queued, running or finished in the last hour[/]", *[""] * 8)
    return t


def _throughput(s: Snapshot) -> Table:
    t = Table(expand=True, box=None, header_style="bold")
    t.add_column("type")
    t.add_column("last 60 min (finished per minute)", no_wrap=True)
    for col in ("done", "failed", "cancelled", "retried", "per min"):
        t.add_column(col, justify="right")
    totals = [0] * 60
    for ttype, series in sorted(s.throughput.items()):
        per_minute = [int(r["done"]) + int(r["failed"]) + int(r["cancelled"]) for r in series]
        totals = [a + b for a, b in zip(totals, per_minute, strict=False)]
        sums = {k: sum(int(r[k]) for r in series) for k in ("done", "failed", "cancelled", "retried")}
        last_full = per_minute[-2] if len(per_minute) > 1 else 0
        t.add_row(
            ttype,
            sparkline(per_minute),
            f"[green]{sums['done']}[/]",
            str(sums["failed"]),
            str(sums["cancelled"]),
            str(sums["retried"]),
            str(last_full),
        )
    if len(s.throughput) > 1:
        t.add_row("[bold]all[/]", sparkline(totals), "", "", "", "", str(totals[-2]))
    if not s.throughput:
        t.add_row("[dim]nothing finished in the last hour[/]", "", "", "", "", "", "")
    return t


def _latency(s: Snapshot) -> Table:
    t = Table(expand=True, box=None, header_style="bold")
    for col in (
        "type",
        "window",
        "tasks",
        "wait p50",
        "wait p95",
        "wait p99",
        "run p50",
        "run p95",
        "run p99",
    ):
        t.add_column(col, justify="left" if col in ("type", "window") else "right")
    for r in s.latency:
        if r["period"] == "24h":
            continue
        t.add_row(
            r["type"],
            r["period"],
            str(r["tasks"]),
            *(_secs(r[k]) for k in ("wait_p50", "wait_p95", "wait_p99", "run_p50", "run_p95", "run_p99")),
        )
    return t


def _workers(s: Snapshot) -> Table:
    t = Table(expand=True, box=None, header_style="bold")
    for col in (
        "worker",
        "host",
        "pid",
        "types",
        "state",
        "heartbeat",
        "running",
        "done",
        "failed",
        "expired",
    ):
        t.add_column(
            col, justify="right" if col in ("pid", "running", "done", "failed", "expired") else "left"
        )
    colors = {"alive": "green", "stale": "red", "stopped": "dim"}
    for w in s.workers:
        expired = int(w["lease_expired"])
        t.add_row(
            w["worker_id"],
            w["host"],
            str(w["pid"]),
            ",".join(w["types"]),
            f"[{colors.get(w['state'], 'white')}]{w['state']}[/]",
            _secs(w["heartbeat_age_seconds"]) + " ago",
            str(w["running"]),
            str(w["done"]),
            str(w["failed"]),
            f"[red]{expired}[/]" if expired else "0",
        )
    if not s.workers:
        t.add_row("[dim]no workers[/]", *[""] * 9)
    return t


def _failures(s: Snapshot, limit: int = 8) -> Table:
    t = Table(expand=True, box=None, header_style="bold")
    t.add_column("type")
    t.add_column("error", overflow="ellipsis", no_wrap=True, ratio=1)
    for col in ("failed", "retried", "last seen"):
        t.add_column(col, justify="right")
    for r in s.failures[:limit]:
        age = (s.at - r["last_seen"]).total_seconds()
        t.add_row(
            r["type"],
            r["error"],
            f"[red]{r['failed']}[/]" if r["failed"] else "0",
            str(r["retried"]),
            _secs(max(0.0, age)) + " ago",
        )
    if not s.failures:
        t.add_row("[dim]no failures in the last 24 hours[/]", "", "", "", "")
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

    console = console or Console()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET application_name = 'jobq top'")
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
