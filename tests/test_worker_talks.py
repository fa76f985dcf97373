"""`jobq worker` tells its operator what it does (issue 13): a line when it starts, at once on the first
Ctrl-C (draining, what remains, the grace left), on the second (what it abandons), and the summary line
however it ends. A real `jobq worker` process, real signals."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from support import SCHEMA, BackgroundWorker, spawn, status, wait_for

from jobqueue import Client
from jobqueue.runtime.worker import WorkerStatus


class Lines:
    """The worker's stdout, read line by line as it comes (the CLI flushes each line)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in {self.lines}")


def test_first_ctrl_c_drains_and_says_so(client: Client, conn: psycopg.Connection[Any], reset: None,
                                         procs: list[Any], db_url: str) -> None:
    tid = client.enqueue("t_sleep", {"s": 6})
    p = spawn("t_sleep", "--grace", "30", "--concurrency", "3")
    procs.append(p)
    out = Lines(p)
    started = out.wait_for("started")
    assert "types t_sleep" in started and "concurrency 3" in started
    user = db_url.split("//")[1].split("@")[0].split(":")[0]
    assert f"database postgresql://{user}@" in started
    wait_for(lambda: status(conn, tid) == "running", timeout=20)
    p.send_signal(signal.SIGINT)
    draining = out.wait_for("draining", timeout=5)  # at once, while the task still runs
    assert status(conn, tid) == "running"
    assert f"1 task(s) still running ({tid})" in draining
    grace = float(re.search(r"(\d+)s of grace left", draining).group(1))  # type: ignore[union-attr]
    assert 28 <= grace <= 30 and "Ctrl-C again" in draining
    assert p.wait(20) == 0
    assert status(conn, tid) == "done"
    assert re.search(r"worker stopped after [\d.]+s: 1 done, 0 failed", out.wait_for("worker stopped"))


def test_second_ctrl_c_says_what_it_abandons(client: Client, conn: psycopg.Connection[Any], reset: None,
                                             procs: list[Any]) -> None:
    ids = [client.enqueue("t_sleep", {"s": 60}) for _ in range(2)]
    p = spawn("t_sleep", "--grace", "30", "--concurrency", "4")
    procs.append(p)
    out = Lines(p)
    wait_for(lambda: all(status(conn, t) == "running" for t in ids), timeout=20)
    p.send_signal(signal.SIGINT)
    out.wait_for("draining: 2 task")
    p.send_signal(signal.SIGINT)
    assert p.wait(10) == 1
    abandon = out.wait_for("abandoning")
    assert f"abandoning 2 task(s) ({ids[0]}, {ids[1]})" in abandon and "rescuer" in abandon
    out.wait_for(r"worker stopped after [\d.]+s: 0 done")
    # Abandoned, not released: the tasks stay running until their lease expires.
    assert [status(conn, t) for t in ids] == ["running", "running"]


@contextmanager
def cap_lock_held(db_url: str) -> Iterator[None]:
    """A capped type is claimed only under its cap's lock (a claim that did not take it gets none of the
    type's rows): while this holds t_sleep's, a worker's claim of it waits in flight."""
    with psycopg.connect(db_url) as locker:
        locker.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{SCHEMA}.cap.t_sleep",))
        yield


def then_two_tasks(client: Client, conn: psycopg.Connection[Any]) -> list[int]:
    """Once a claim waits for the lock (a worker's first claim, begun before these exist), two tasks it
    must take when it gets the lock: the claim reads the time of its statement, not of its transaction."""
    wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
                                  " AND datname = current_database()").fetchone() == (1,), timeout=20)
    return client.enqueue_many("t_sleep", [{"s": 60}, {"s": 60}])


def test_first_ctrl_c_during_a_claim_counts_its_rows(client: Client, conn: psycopg.Connection[Any], reset: None,
                                                     procs: list[Any], db_url: str) -> None:
    """A claim commits its rows `running` a moment before the worker holds them; a Ctrl-C in that moment
    (seen once in CI) said "no task running" and then ran them. The line waits for the claim to land."""
    client.cap("t_sleep", 10)
    with cap_lock_held(db_url):
        p = spawn("t_sleep", "--grace", "30", "--concurrency", "4")
        procs.append(p)
        out = Lines(p)
        ids = then_two_tasks(client, conn)
        p.send_signal(signal.SIGINT)
        time.sleep(0.2)  # without the fix the line came at once
        assert not [line for line in out.lines if "draining" in line or "stopping" in line]
    draining = out.wait_for("draining|stopping", timeout=5)
    assert f"draining: 2 task(s) still running ({ids[0]}, {ids[1]})" in draining
    p.send_signal(signal.SIGINT)
    assert p.wait(10) == 1


def test_a_failed_draining_report_does_not_stop_the_drain(client: Client, conn: psycopg.Connection[Any],
                                                          reset: None, db_url: str) -> None:
    """The shutdown waits for the draining line said after a claim in flight; a report that fails (the
    operator's stdout closed) is logged, and the drain still releases the tasks after the grace."""
    def on_status(st: WorkerStatus) -> None:
        if st.event == "draining":
            raise BrokenPipeError("stdout closed")

    client.cap("t_sleep", 10)
    bw = BackgroundWorker(["t_sleep"], concurrency=4, grace_seconds=0.5, on_status=on_status)
    try:
        with cap_lock_held(db_url):  # released before the worker is waited for: its claim needs it
            bw.__enter__()
            ids = then_two_tasks(client, conn)
            assert bw.worker is not None and bw._loop is not None
            bw._loop.call_soon_threadsafe(bw.worker._on_signal, signal.SIGINT)
        bw.thread.join(30)
        assert not bw.thread.is_alive()
    finally:
        bw.stop(timeout=5)  # raises what the worker raised
    assert [status(conn, t) for t in ids] == ["queued", "queued"]  # both started, then were released


def test_idle_worker_stops_at_once(conn: psycopg.Connection[Any], clean: None, procs: list[Any]) -> None:
    p = spawn("t_sleep")
    procs.append(p)
    out = Lines(p)
    out.wait_for("started")
    p.send_signal(signal.SIGINT)
    assert p.wait(20) == 0
    out.wait_for("stopping: no task running")
    out.wait_for("worker stopped after")
