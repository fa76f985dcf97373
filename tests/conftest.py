"""Test fixtures: a real PostgreSQL for every test that touches data, never a mock.

By default the embedded server (one per test session, in a temporary JOBQ_HOME); with
JOBQ_TEST_DATABASE_URL set, that server instead (CI runs the suite once on each). Each test module
gets a database of its own, migrated to head, so modules cannot see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from jobqueue.settings import get_settings

REPO = Path(__file__).resolve().parent.parent
FULL = os.environ.get("JOBQ_TEST_PROFILE") == "full"


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the server under test (its maintenance database)."""
    external = os.environ.get("JOBQ_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from jobqueue import embedded

    home = Path(os.environ.get("JOBQ_TEST_HOME") or tmp_path_factory.mktemp("jobq-home"))
    os.environ["JOBQ_HOME"] = str(home)
    info = embedded.ensure_running(home)
    try:
        yield info.url("postgres")
    finally:
        embedded.stop(home, mode="immediate")


@pytest.fixture(scope="session")
def embedded_home(server_url: str) -> Path | None:
    return None if os.environ.get("JOBQ_TEST_DATABASE_URL") else Path(os.environ["JOBQ_HOME"])


def create_database(server_url: str, prefix: str = "jobq_t") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


def drop_database(server_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def db_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test module; JOBQ_DATABASE_URL points at it."""
    from jobqueue.migrate import migrate

    url = create_database(server_url)
    old = os.environ.get("JOBQ_DATABASE_URL")
    os.environ["JOBQ_DATABASE_URL"] = url
    get_settings.cache_clear()
    migrate(url)
    try:
        yield url
    finally:
        if old is None:
            os.environ.pop("JOBQ_DATABASE_URL", None)
        else:
            os.environ["JOBQ_DATABASE_URL"] = old
        get_settings.cache_clear()
        drop_database(server_url, url)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def clean(conn: psycopg.Connection[Any]) -> None:
    """Start the test with an empty queue."""
    conn.execute("TRUNCATE jobq.tasks, jobq.workers, jobq.queues RESTART IDENTITY CASCADE")


@pytest.fixture
def client(db_url: str) -> Iterator[Any]:
    from jobqueue import Client

    c = Client(db_url)
    yield c
    c.close()


def jobq_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `jobq` command the way a user does."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jobqueue", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, input=input, cwd=REPO)


class BackgroundWorker:
    """A Worker running in a thread of the test process (its own event loop)."""

    def __init__(self, types: list[str], **kwargs: Any) -> None:
        from jobqueue.worker import Worker

        self.kwargs = kwargs
        self.types = types
        self.worker: Worker | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        from jobqueue.worker import Worker

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
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


# ---------------------------------------------------------------- sample documents (unit tests)

SAMPLES = REPO / "examples" / "samples"
TEST_DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def handbook_pdf() -> bytes:
    """The 37-page sample PDF generated by examples/make_samples.py."""
    return (SAMPLES / "handbook.pdf").read_bytes()


@pytest.fixture(scope="session")
def inventory_csv() -> bytes:
    """The 7,000-row sample CSV."""
    return (SAMPLES / "inventory.csv").read_bytes()


@pytest.fixture(scope="session")
def guide_md() -> bytes:
    return (SAMPLES / "guide.md").read_bytes()


@pytest.fixture(scope="session")
def encrypted_pdf() -> bytes:
    return (TEST_DATA / "encrypted.pdf").read_bytes()


@pytest.fixture(scope="session")
def truncated_pdf() -> bytes:
    return (TEST_DATA / "truncated.pdf").read_bytes()
