"""`jobq exporter`: cluster-wide Prometheus metrics read from the observation views.

A worker's own metrics (observe/metrics.py) describe what that process did; queue depth, the oldest
wait or stale workers are facts about the whole cluster, so one exporter per cluster reads them from
the views at scrape time (a custom collector: nothing is cached, a scrape sees the database as it is
now). Every metric here is prefixed ``jobq_cluster_`` so it never collides with a worker metric of
another type (a worker's ``jobq_task_run_seconds`` is a histogram, the exporter's run time is a
gauge of view percentiles).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily
from prometheus_client.registry import Collector

from jobqueue.db.connect import connect, redact_text
from jobqueue.observe.snapshot import Snapshot, fetch

log = logging.getLogger("jobq.exporter")

STATES = ("runnable", "scheduled", "waiting", "running")


class ViewsCollector(Collector):
    """Reads the views once per scrape through one connection, re-opened after any error."""

    def __init__(self, url: str, schema: str = "jobq") -> None:
        self.url = url
        self.schema = schema
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # scrapes run in the HTTP server's threads

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _snapshot(self) -> Snapshot:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url, autocommit=True, application_name="jobq exporter")
        return fetch(self._conn, self.schema)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        started = time.perf_counter()
        up = GaugeMetricFamily("jobq_cluster_up", "1 if the exporter could read the views on this scrape")
        with self._lock:
            try:
                snap = self._snapshot()
            except (psycopg.Error, OSError, Exception) as exc:  # a scrape reports failure, never raises
                log.warning("cannot read the views: %s", redact_text(str(exc)))
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                up.add_metric([], 0)
                yield up
                return
        up.add_metric([], 1)
        yield up
        yield from self._families(snap)
        took = GaugeMetricFamily("jobq_cluster_scrape_seconds", "Time spent reading the views")
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _families(self, s: Snapshot) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "jobq_cluster_queue_tasks", "Live tasks by type and state", labels=["type", "state"]
        )
        wait = GaugeMetricFamily(
            "jobq_cluster_queue_oldest_wait_seconds",
            "How long the oldest runnable task of a type has waited",
            labels=["type"],
        )
        paused = GaugeMetricFamily(
            "jobq_cluster_queue_paused", "1 if the type's queue is paused", labels=["type"]
        )
        cap = GaugeMetricFamily(
            "jobq_cluster_queue_max_running", "The type's cluster-wide cap on running tasks (capped types only)",
            labels=["type"],
        )
        serving = GaugeMetricFamily(
            "jobq_cluster_queue_workers",
            "Live workers serving the type (0 with runnable tasks: a typo or a missing worker)",
            labels=["type"],
        )
        for q in s.queues:
            for state in STATES:
                depth.add_metric([q.type, state], getattr(q, state))
            wait.add_metric([q.type], q.oldest_wait_seconds)
            paused.add_metric([q.type], 1 if q.paused else 0)
            serving.add_metric([q.type], q.workers)
            if q.max_running is not None:
                cap.add_metric([q.type], q.max_running)
        yield from (depth, wait, paused, cap, serving)

        finished = GaugeMetricFamily(
            "jobq_cluster_tasks_finished_last_hour",
            "Tasks finished (or put back for a retry) in the last 60 minutes",
            labels=["type", "outcome"],
        )
        last_minute = GaugeMetricFamily(
            "jobq_cluster_tasks_finished_last_minute",
            "Tasks finished in the last complete minute",
            labels=["type", "outcome"],
        )
        for ttype, series in s.throughput.items():
            for outcome in ("done", "failed", "cancelled", "retried"):
                finished.add_metric([ttype, outcome], sum(int(r[outcome]) for r in series))
                last_minute.add_metric([ttype, outcome], int(series[-2][outcome]) if len(series) > 1 else 0)
        yield from (finished, last_minute)

        wait_q = GaugeMetricFamily(
            "jobq_cluster_task_wait_seconds",
            "Wait from run_at to start, percentiles over a recent window",
            labels=["type", "window", "quantile"],
        )
        run_q = GaugeMetricFamily(
            "jobq_cluster_task_run_seconds",
            "Handler run time, percentiles over a recent window",
            labels=["type", "window", "quantile"],
        )
        for r in s.latency:
            for quantile, col in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
                if r[f"wait_{col}"] is not None:
                    wait_q.add_metric([r["type"], r["period"], quantile], float(r[f"wait_{col}"]))
                if r[f"run_{col}"] is not None:
                    run_q.add_metric([r["type"], r["period"], quantile], float(r[f"run_{col}"]))
        yield from (wait_q, run_q)
        yield from self._flow(s)

    @staticmethod
    def _flow(s: Snapshot) -> Iterator[GaugeMetricFamily]:
        """Flow-controlled keys (issue 14): running per key, and what a limit or a rate holds back."""
        running = GaugeMetricFamily("jobq_cluster_flow_running", "Running tasks per flow key", labels=["type", "key"])
        held = GaugeMetricFamily("jobq_cluster_flow_held_back",
                                 "Runnable tasks a per-key limit or a rate holds back", labels=["type", "key", "by"])
        wait = GaugeMetricFamily("jobq_cluster_flow_wait_seconds",
                                 "Seconds until a rate-limited key may start a task again", labels=["type", "key"])
        for r in s.flow:
            running.add_metric([r["type"], r["key"]], int(r["running"]))
            if r["held_by"]:
                held.add_metric([r["type"], r["key"], r["held_by"]], int(r["held_back"]))
            if r["wait_seconds"] is not None:
                wait.add_metric([r["type"], r["key"]], float(r["wait_seconds"]))
        yield from (running, held, wait)

        workers = GaugeMetricFamily("jobq_cluster_workers", "Workers by state", labels=["state"])
        counts = {"alive": 0, "stale": 0, "stopped": 0}
        running = GaugeMetricFamily(
            "jobq_cluster_worker_running_tasks", "Tasks running per live worker", labels=["worker", "host"]
        )
        beat = GaugeMetricFamily(
            "jobq_cluster_worker_heartbeat_age_seconds",
            "Seconds since a live worker's last heartbeat",
            labels=["worker", "host"],
        )
        expired = GaugeMetricFamily(
            "jobq_cluster_lease_expired_tasks", "Running tasks whose lease expired (the rescuer's next work)"
        )
        for w in s.workers:
            counts[w["state"]] = counts.get(w["state"], 0) + 1
            if w["state"] != "stopped":
                running.add_metric([w["worker_id"], w["host"]], int(w["running"]))
                beat.add_metric([w["worker_id"], w["host"]], float(w["heartbeat_age_seconds"]))
        for state, n in counts.items():
            workers.add_metric([state], n)
        expired.add_metric([], sum(int(w["lease_expired"]) for w in s.workers))
        yield from (workers, running, beat, expired)

        failures = GaugeMetricFamily(
            "jobq_cluster_failures_last_day",
            "Tasks that failed, or failed an attempt and were retried, in 24 hours",
            labels=["type", "outcome"],
        )
        per_type: dict[str, list[int]] = {}
        for f in s.failures:
            acc = per_type.setdefault(f["type"], [0, 0])
            acc[0] += int(f["failed"])
            acc[1] += int(f["retried"])
        for ttype, (failed, retried) in per_type.items():
            failures.add_metric([ttype, "failed"], failed)
            failures.add_metric([ttype, "retried"], retried)
        yield failures


def build_registry(url: str, schema: str) -> tuple[CollectorRegistry, ViewsCollector]:
    registry = CollectorRegistry(auto_describe=False)
    collector = ViewsCollector(url, schema)
    registry.register(collector)
    return registry, collector


def serve(url: str, schema: str, port: int, addr: str = "0.0.0.0") -> int:
    """Serve /metrics until SIGTERM or Ctrl-C; returns the exit code."""
    from prometheus_client import start_http_server

    registry, collector = build_registry(url, schema)
    server, thread = start_http_server(port, addr=addr, registry=registry)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.info("exporter serving on %s:%d", addr, port)
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.shutdown()
        thread.join(5)
        collector.close()
    return 0
