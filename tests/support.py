"""Helpers for the tests: a real PostgreSQL per module, the CLI as a user runs it, a worker in a thread.

Imported by the tests and by conftest.py (which holds only fixtures).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

REPO = Path(__file__).resolve().parent.parent
FULL = os.environ.get("JOBQ_TEST_PROFILE") == "full"
# The schema under test: CI runs the suite once under a non-default one. Each test database sets its
# search_path to it, so tests write table and view names unqualified.
SCHEMA = os.environ.get("JOBQ_SCHEMA") or "jobq"
SAMPLES = REPO / "examples" / "samples"
TEST_DATA = REPO / "tests" / "data"


def channel(name: str) -> str:
    """A NOTIFY channel of the schema under test (`<schema>.<name>`)."""
    return f"{SCHEMA}.{name}"


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def create_database(server_url: str, prefix: str = "jobq_t") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(f'ALTER DATABASE "{name}" SET search_path = "{SCHEMA}", public')
    return with_database(server_url, name)


def drop_database(server_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def jobq_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `jobq` command the way a user does."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jobqueue", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, input=input, cwd=REPO)


class BackgroundWorker:
    """A Worker running in a thread of the test process (its own event loop)."""

    def __init__(self, types: list[str], **kwargs: Any) -> None:
        from jobqueue.runtime.worker import Worker

        self.kwargs = kwargs
        self.types = types
        self.worker: Worker | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        from jobqueue.runtime.worker import Worker

        async def go() -> None:
            self._loop = asyncio.get_running_loop()
            self.worker = Worker(self.types, **self.kwargs)
            self._ready.set()
            await self.worker.run()

        try:
            asyncio.run(go())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self._ready.set()

    def __enter__(self) -> BackgroundWorker:
        self.thread.start()
        self._ready.wait(30)
        return self

    def stop(self, timeout: float = 30) -> None:
        if self._loop is not None and self.worker is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self.worker.stop)
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    """The first column of the one row `sql` returns."""
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def status(conn: psycopg.Connection[Any], task_id: int) -> str:
    return str(one(conn, "SELECT status FROM tasks WHERE id = %s", task_id))


def spawn(types: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`jobq worker --types TYPES --import handlers` in a child process, as an operator runs it."""
    tests = str(REPO / "tests")
    full_env = {**os.environ, "PYTHONPATH": tests + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "jobqueue", "worker", "--types", types, "--import", "handlers", *extra],
        env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)



@contextmanager
def serve(app: Any) -> Iterator[str]:
    """An ASGI app served by uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=30)
        assert server.started, "the console did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def dashboard_login(url: str, kind: str = "dashboard") -> str:
    """The URL of a new login in a role `jobq roles` creates: by default the read-only <schema>_dashboard
    (`kind` "producer" for <schema>_producer)."""
    res = jobq_cli("roles")
    assert res.returncode == 0, res.stderr
    login = f"{'viewer' if kind == 'dashboard' else kind}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f"CREATE ROLE {login} LOGIN IN ROLE {SCHEMA}_{kind}")
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{login}@{parts.netloc.rsplit('@', 1)[-1]}"))


def drop_login(url: str, login_url: str) -> None:
    """Drop the login dashboard_login made (roles are cluster-wide: they outlive the test database)."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f'DROP ROLE IF EXISTS "{urlsplit(login_url).username}"')
