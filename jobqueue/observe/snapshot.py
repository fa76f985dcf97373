"""One read of the observation views (migration 0003): what `jobq top`, `jobq stats` and the exporter show.

A snapshot is plain data (what `jobq stats --json` prints); the terminal rendering lives in the CLI
(jobqueue/cli/top.py), the Prometheus families in observe/exporter.py, so this module needs neither
rich nor prometheus_client.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from jobqueue.db.queries import ObserveSQL

# Stopped workers stay in the panel this long, so a crash or a rolling restart remains visible.
STOPPED_VISIBLE_SECONDS = 3600
# Failing (type, error) groups read per snapshot: the panel shows 8, the JSON all of these.
FAILURE_GROUPS = 20
# Flow-controlled keys read per snapshot (held back and busiest first): fair_by doc_id has many.
FLOW_KEYS = 50
# Cron schedules read per snapshot (the next to fire first).
SCHEDULES = 10
_COUNTS = ("queued", "runnable", "scheduled", "waiting", "running",
           "done_last_hour", "failed_last_hour", "cancelled_last_hour")


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
    max_running: int | None = None  # the cluster-wide cap (jobq queue cap)
    workers: int = 0  # live workers serving the type: none with queued tasks is a typo or a missing worker

    @property
    def unserved(self) -> bool:
        return self.queued > 0 and self.workers == 0


@dataclass
class Snapshot:
    at: datetime
    queues: list[QueueRow]
    # type -> per-minute rows (oldest first): minute, done, failed, cancelled, retried
    throughput: dict[str, list[dict[str, Any]]]
    latency: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    # Per (type, key) of flow-controlled types: running, queued, held back by a limit or a rate, wait.
    flow: list[dict[str, Any]] = field(default_factory=list)
    schedules: list[dict[str, Any]] = field(default_factory=list)

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


def fetch(conn: psycopg.Connection[Any], schema: str) -> Snapshot:
    """Read every view once, in one read-only snapshot so the panels agree with each other."""
    q = ObserveSQL.load(schema)
    with conn.transaction(), psycopg.RawCursor(conn, row_factory=dict_row) as cur:
        cur.execute(q.snapshot_begin)
        now_row = cur.execute(q.now).fetchone()
        assert now_row is not None
        depth = cur.execute(q.queue_depth).fetchall()
        state = cur.execute(q.queue_state).fetchall()
        thr = cur.execute(q.throughput).fetchall()
        lat = cur.execute(q.latency).fetchall()
        workers = cur.execute(q.workers, (STOPPED_VISIBLE_SECONDS,)).fetchall()
        failures = cur.execute(q.failures, (FAILURE_GROUPS,)).fetchall()
        flow = cur.execute(q.flow_control, (FLOW_KEYS,)).fetchall()
        schedules = cur.execute(q.schedules, (SCHEDULES,)).fetchall()
    queues: dict[str, QueueRow] = {}
    for r in depth:
        row = queues.setdefault(r["type"], QueueRow(type=r["type"]))
        for name in _COUNTS:
            setattr(row, name, getattr(row, name) + int(r[name]))
        row.oldest_wait_seconds = max(row.oldest_wait_seconds, float(r["oldest_wait_seconds"]))
        row.paused = row.paused or bool(r["paused"])
        row.priorities.append(int(r["priority"]))
    for r in state:  # pause, cap and workers of every type, also of paused or capped queues with no task
        if r["type"] not in queues and not r["paused"] and r["max_running"] is None:
            continue  # a type a worker serves with nothing to show
        known = queues.setdefault(r["type"], QueueRow(type=r["type"]))
        known.paused, known.max_running, known.workers = bool(r["paused"]), r["max_running"], int(r["workers"])
    throughput: dict[str, list[dict[str, Any]]] = {}
    for r in thr:
        throughput.setdefault(r.pop("type"), []).append(r)
    return Snapshot(at=now_row["now"], queues=list(queues.values()), throughput=throughput,
                    latency=[dict(r) for r in lat], workers=[dict(r) for r in workers],
                    failures=[dict(r) for r in failures], flow=[dict(r) for r in flow],
                    schedules=[dict(r) for r in schedules])
