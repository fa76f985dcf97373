"""Prometheus: a real `jobq worker --metrics-port` after a few tasks, and `jobq exporter` over the views."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import REPO, wait_for

from jobqueue import Client
from jobqueue.observe.exporter import ViewsCollector

HANDLERS = """
from typing import Any
from jobqueue import Context, Fail, task

_seen: set[int] = set()

@task("m_ok")
async def m_ok(ctx: Context, payload: Any) -> Any:
    return {"ok": True}

@task("m_fail")
async def m_fail(ctx: Context, payload: Any) -> Any:
    raise Fail("refused")

@task("m_retry", backoff_base=0.05, backoff_max=0.1)
async def m_retry(ctx: Context, payload: Any) -> Any:
    if ctx.id not in _seen:
        _seen.add(ctx.id)
        raise ValueError("once")
    return None
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def handlers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("handlers")
    (d / "metrics_handlers.py").write_text(textwrap.dedent(HANDLERS))
    sys.path.insert(0, str(d))
    importlib.import_module("metrics_handlers")  # registers the types for the producer side too

    yield d
    sys.path.remove(str(d))


def start(args: list[str], handlers: Path, **env: str) -> subprocess.Popen[str]:
    full = {**os.environ, "PYTHONPATH": f"{handlers}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "jobqueue", *args],
        cwd=REPO,
        env=full,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop(p: subprocess.Popen[str]) -> tuple[int, str]:
    p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return p.returncode, err


def wait_http(port: int, proc: subprocess.Popen[str]) -> None:
    def up() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            scrape(port)
            return True
        except OSError:
            return False

    wait_for(up, timeout=30, interval=0.1)


def test_worker_metrics_endpoint(
    db_url: str, handlers: Path, client: Client, conn: psycopg.Connection[Any]
) -> None:
    ok = client.enqueue_many("m_ok", [{}] * 3)
    client.enqueue_many("m_fail", [{}] * 2)
    client.enqueue("m_retry", {})
    # A task whose worker died: its lease expired, the new worker's rescuer requeues it.
    conn.execute(
        "INSERT INTO tasks (type, status, worker_id, attempt, started_at, lease_expires_at) "
        "VALUES ('m_ok', 'running', 'dead-worker', 1, now() - interval '1 minute', "
        "now() - interval '10 seconds')"
    )
    port = free_port()
    proc = start(
        [
            "worker",
            "--import",
            "metrics_handlers",
            "--types",
            "m_ok,m_fail,m_retry",
            "--metrics-port",
            str(port),
            "--poll",
            "0.2",
            "--concurrency",
            "4",
        ],
        handlers,
        JOBQ_HEARTBEAT_SECONDS="0.3",
    )
    try:
        wait_http(port, proc)
        wait_for(
            lambda: (
                conn.execute("SELECT count(*) FROM tasks WHERE finished_at IS NULL").fetchone() == (0,)
            ),
            timeout=30,
        )
        m = scrape(port)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert all(client.get(i).status == "done" for i in ok)
    finished = "jobq_tasks_finished_total"
    assert sample(m, finished, type="m_ok", outcome="done") == 4  # 3 + the rescued one
    assert sample(m, finished, type="m_fail", outcome="failed") == 2
    assert sample(m, finished, type="m_retry", outcome="retried") == 1
    assert sample(m, finished, type="m_retry", outcome="done") == 1
    assert sample(m, "jobq_task_run_seconds_count", type="m_ok") == 4
    assert sample(m, "jobq_task_queue_wait_seconds_count", type="m_ok") == 4
    assert sample(m, "jobq_task_run_seconds_bucket", type="m_fail", le="+Inf") == 2
    for t in ("m_ok", "m_fail", "m_retry"):
        assert sample(m, "jobq_tasks_in_flight", type=t) == 0
    assert sample(m, "jobq_lease_rescues_total") == 1
    assert sample(m, "jobq_claim_batch_size_count") >= 1
    assert sample(m, "jobq_claim_batch_size_sum") == 4 + 2 + 2  # every claimed attempt, once
    assert sample(m, "jobq_claim_seconds_count") == sample(m, "jobq_claim_batch_size_count")
    assert sample(m, "jobq_listen_reconnects_total") == 0
    info = [labels for (name, labels) in m if name == "jobq_worker_info"]
    assert len(info) == 1 and dict(info[0])["types"] == "m_ok,m_fail,m_retry"


def test_exporter_reads_the_views(
    db_url: str, handlers: Path, client: Client, conn: psycopg.Connection[Any]
) -> None:
    conn.execute("TRUNCATE tasks, workers RESTART IDENTITY CASCADE")
    client.enqueue_many("m_ok", [{}] * 4)
    client.enqueue("m_ok", {}, delay=3600)
    conn.execute(
        "INSERT INTO tasks (type, status, run_at, finished_at, started_at, process_duration, "
        "last_error) "
        "SELECT 'm_fail', 'failed', now() - interval '2 s', now(), now() - interval '1 s', 0.5, "
        "'Fail: refused' FROM generate_series(1, 3)"
    )
    conn.execute(
        "INSERT INTO workers (id, host, pid, types, concurrency) VALUES ('w1', 'h', 1, '{m_ok}', 2)"
    )
    port = free_port()
    proc = start(["exporter", "--port", str(port), "--addr", "127.0.0.1"], handlers)
    try:
        wait_http(port, proc)
        m = scrape(port)
        client.enqueue("m_ok", {})
        m2 = scrape(port)  # nothing is cached: a scrape reads the database as it is now
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert sample(m, "jobq_cluster_up") == 1
    assert sample(m, "jobq_cluster_queue_tasks", type="m_ok", state="runnable") == 4
    assert sample(m2, "jobq_cluster_queue_tasks", type="m_ok", state="runnable") == 5
    assert sample(m, "jobq_cluster_queue_tasks", type="m_ok", state="scheduled") == 1
    assert sample(m, "jobq_cluster_queue_tasks", type="m_ok", state="running") == 0
    assert sample(m, "jobq_cluster_queue_oldest_wait_seconds", type="m_ok") >= 0
    assert sample(m, "jobq_cluster_tasks_finished_last_hour", type="m_fail", outcome="failed") == 3
    assert sample(m, "jobq_cluster_task_run_seconds", type="m_fail", window="5m", quantile="0.99") == 0.5
    assert sample(
        m, "jobq_cluster_task_wait_seconds", type="m_fail", window="1h", quantile="0.5"
    ) == pytest.approx(1.0, abs=0.01)
    assert sample(m, "jobq_cluster_workers", state="alive") == 1
    assert sample(m, "jobq_cluster_worker_running_tasks", worker="w1", host="h") == 0
    assert sample(m, "jobq_cluster_failures_last_day", type="m_fail", outcome="failed") == 3
    assert sample(m, "jobq_cluster_lease_expired_tasks") == 0


def test_exporter_reports_a_database_it_cannot_read() -> None:
    collector = ViewsCollector("postgresql://nobody@127.0.0.1:1/nothing")
    started = time.monotonic()
    families = list(collector.collect())
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [("jobq_cluster_up", [0.0])]
    assert time.monotonic() - started < 10


def test_importing_jobq_registers_nothing_in_the_global_registry() -> None:
    """Metrics register when served: an application importing jobq (or the worker) keeps its registry."""
    probe = """
import prometheus_client
import jobqueue.runtime.worker, jobqueue.observe.metrics as m, jobqueue.observe.exporter
names = sorted(n for n in prometheus_client.REGISTRY._names_to_collectors if n.startswith("jobq"))
print("BEFORE", names)
m.register(); m.register()
print("AFTER", "jobq_tasks_finished" in prometheus_client.REGISTRY._names_to_collectors)
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "BEFORE []" in r.stdout and "AFTER True" in r.stdout, r.stdout
