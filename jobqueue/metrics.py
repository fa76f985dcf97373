"""Prometheus metrics of a worker process (served by ``jobq worker --metrics-port``).

Names follow Prometheus conventions (``jobq_`` prefix, ``_total`` counters, ``_seconds`` units).
Cluster-wide numbers (queue depth) come from ``jobq exporter``, which reads the views instead.
"""

from __future__ import annotations

import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

TASKS_FINISHED = Counter("jobq_tasks_finished_total", "Tasks finished by this worker", ["type", "outcome"])
RUN_SECONDS = Histogram("jobq_task_run_seconds", "Handler run time", ["type"],
                        buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 1, 5, 30, 120, 600, 3600))
QUEUE_WAIT = Histogram("jobq_task_queue_wait_seconds", "From run_at to claim", ["type"],
                       buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 1, 5, 30, 120, 600))
IN_FLIGHT = Gauge("jobq_tasks_in_flight", "Tasks running in this worker", ["type"])
CLAIM_BATCH = Histogram("jobq_claim_batch_size", "Tasks per claim statement",
                        buckets=(0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000))
CLAIM_SECONDS = Histogram("jobq_claim_seconds", "Claim statement latency",
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
LISTEN_RECONNECTS = Counter("jobq_listen_reconnects_total", "LISTEN connection re-establishments")
RESCUED = Counter("jobq_lease_rescues_total", "Tasks rescued from expired leases by this worker")
PROGRESS_WRITES = Counter("jobq_progress_writes_total", "Coalesced progress statements")
WORKER = Info("jobq_worker", "This worker")

_OUTCOME = {"done": "done", "retry": "retried", "fail": "failed", "cancelled": "cancelled", "snooze": "snoozed"}


def worker_info(worker_id: str, types: list[str]) -> None:
    WORKER.info({"id": worker_id, "types": ",".join(types)})


def observe_claim(n: int, seconds: float) -> None:
    CLAIM_BATCH.observe(n)
    CLAIM_SECONDS.observe(seconds)


@lru_cache(maxsize=1024)
def _children(task_type: str) -> tuple[Any, Any, Any]:
    # labels() takes a lock and a dict look-up per call; on the hot path the children are cached.
    return IN_FLIGHT.labels(task_type), QUEUE_WAIT.labels(task_type), RUN_SECONDS.labels(task_type)


@lru_cache(maxsize=4096)
def _finished_child(task_type: str, outcome: str) -> Any:
    return TASKS_FINISHED.labels(task_type, _OUTCOME.get(outcome, outcome))


def started(task_type: str, run_at: datetime) -> None:
    in_flight, wait, _ = _children(task_type)
    in_flight.inc()
    wait.observe(max(0.0, time.time() - run_at.timestamp()))


def finished(task_type: str, outcome: str, seconds: float) -> None:
    in_flight, _, run = _children(task_type)
    in_flight.dec()
    _finished_child(task_type, outcome).inc()
    run.observe(seconds)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr)
