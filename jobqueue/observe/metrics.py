"""Prometheus metrics of a worker process (served by ``jobq worker --metrics-port``).

Names follow Prometheus conventions (``jobq_`` prefix, ``_total`` counters, ``_seconds`` units).
Cluster-wide numbers (queue depth) come from ``jobq exporter``, which reads the views instead.

Nothing registers into prometheus_client's global registry at import: an application that imports
jobq (or runs two workers in one process, or its own metrics of the same names) keeps its registry
to itself. The metrics are always counted and are registered once, by :func:`serve`, when a process
actually serves them.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

# registry=None: created unregistered; serve() registers them.
CLAIM_BATCH = Histogram("jobq_claim_batch_size", "Tasks per claim statement",
                        buckets=(0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000), registry=None)
CLAIM_SECONDS = Histogram("jobq_claim_seconds", "Claim statement latency",
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5), registry=None)
LISTEN_RECONNECTS = Counter("jobq_listen_reconnects_total", "LISTEN connection re-establishments", registry=None)
RESCUED = Counter("jobq_lease_rescues_total", "Tasks rescued from expired leases by this worker", registry=None)
PROGRESS_WRITES = Counter("jobq_progress_writes_total", "Coalesced progress statements", registry=None)
WORKER = Info("jobq_worker", "This worker", registry=None)

_OUTCOME = {"done": "done", "retry": "retried", "fail": "failed", "cancelled": "cancelled", "snooze": "snoozed"}


def worker_info(worker_id: str, types: list[str]) -> None:
    WORKER.info({"id": worker_id, "types": ",".join(types)})


def observe_claim(n: int, seconds: float) -> None:
    CLAIM_BATCH.observe(n)
    CLAIM_SECONDS.observe(seconds)


class _TaskMetrics(Collector):
    """Per-task metrics kept in plain Python and exposed by a custom collector.

    A worker finishes tens of thousands of tasks a second; prometheus-client's Histogram takes a lock
    and walks its buckets per observation, which measured at about a quarter of the worker's CPU per
    no-op task. Here a task costs a bisect and a few additions; the families are built only when
    Prometheus scrapes.
    """

    def __init__(self) -> None:
        self.finished: dict[tuple[str, str], int] = {}
        self.in_flight: dict[str, int] = {}
        self.run: dict[str, list[float]] = {}
        self.wait: dict[str, list[float]] = {}

    @staticmethod
    def _observe(store: dict[str, list[float]], key: str, buckets: tuple[float, ...], value: float) -> None:
        row = store.get(key)
        if row is None:
            row = store[key] = [0.0] * (len(buckets) + 2)  # per-bucket counts, +Inf, sum
        row[bisect_left(buckets, value)] += 1
        row[-1] += value

    def collect(self) -> Iterator[Metric]:
        fin = CounterMetricFamily("jobq_tasks_finished", "Tasks finished by this worker", labels=["type", "outcome"])
        for (task_type, outcome), n in sorted(self.finished.items()):
            fin.add_metric([task_type, outcome], n)
        yield fin
        flight = GaugeMetricFamily("jobq_tasks_in_flight",
                                   "Tasks this worker holds: running, or claimed ahead of a free slot",
                                   labels=["type"])
        for task_type, n in sorted(self.in_flight.items()):
            flight.add_metric([task_type], n)
        yield flight
        for name, doc, store, buckets in (
            ("jobq_task_run_seconds", "Handler run time", self.run, RUN_BUCKETS),
            ("jobq_task_queue_wait_seconds", "From run_at to claim", self.wait, WAIT_BUCKETS),
        ):
            fam = HistogramMetricFamily(name, doc, labels=["type"])
            for task_type, row in sorted(store.items()):
                cumulative: list[tuple[str, float]] = []
                acc = 0.0
                for bound, count in zip((*buckets, float("inf")), row[:-1], strict=True):
                    acc += count
                    cumulative.append((_bound(bound), acc))
                fam.add_metric([task_type], cumulative, row[-1])
            yield fam


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(b))


RUN_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.02, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)
WAIT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.02, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0)
TASKS = _TaskMetrics()
COLLECTORS: tuple[Collector, ...] = (CLAIM_BATCH, CLAIM_SECONDS, LISTEN_RECONNECTS, RESCUED, PROGRESS_WRITES,
                                     WORKER, TASKS)
_registered: set[int] = set()
_register_lock = threading.Lock()


def register(registry: CollectorRegistry = REGISTRY) -> None:
    """Add this process's worker metrics to `registry` (once per registry; a second call is a no-op)."""
    with _register_lock:
        if id(registry) in _registered:
            return
        for collector in COLLECTORS:
            registry.register(collector)
        _registered.add(id(registry))


def started(task_type: str, run_at: datetime) -> None:
    TASKS.in_flight[task_type] = TASKS.in_flight.get(task_type, 0) + 1
    TASKS._observe(TASKS.wait, task_type, WAIT_BUCKETS, max(0.0, time.time() - run_at.timestamp()))


def started_many(rows: Sequence[Any]) -> None:
    """``started`` for each row of a claim (its ``type`` and ``run_at``: a datetime, or microseconds
    since the epoch as the plain claim returns it), with one clock read."""
    now = time.time()
    in_flight, observe, wait = TASKS.in_flight, TASKS._observe, TASKS.wait
    for r in rows:
        task_type, run_at = r["type"], r["run_at"]
        in_flight[task_type] = in_flight.get(task_type, 0) + 1
        since = now - (run_at / 1e6 if type(run_at) is int else run_at.timestamp())
        observe(wait, task_type, WAIT_BUCKETS, since if since > 0.0 else 0.0)


def unstarted(task_type: str) -> None:
    """A task claimed ahead of a free slot left this worker without running (released, or lost)."""
    TASKS.in_flight[task_type] -= 1


def finished(task_type: str, outcome: str, seconds: float) -> None:
    tasks = TASKS
    tasks.in_flight[task_type] -= 1
    key = (task_type, _OUTCOME.get(outcome, outcome))
    done = tasks.finished
    done[key] = done.get(key, 0) + 1
    row = tasks.run.get(task_type)
    if row is None:
        row = tasks.run[task_type] = [0.0] * (len(RUN_BUCKETS) + 2)
    row[bisect_left(RUN_BUCKETS, seconds)] += 1
    row[-1] += seconds


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics (these metrics plus prometheus_client's process and platform ones) on `port`."""
    from prometheus_client import start_http_server

    register(REGISTRY)
    start_http_server(port, addr=addr)
