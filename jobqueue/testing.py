"""Test helpers for jobq users: a pytest plugin (loaded through the ``pytest11`` entry point), ``drain``, ``eager``.

Fixtures (all named ``jobq_*``, so they never shadow a project's own):

- ``jobq_url``: a database of the test's own, migrated, with ``JOBQ_DATABASE_URL`` pointing at it for the
  test's duration (``Client()``, ``jobqueue.enqueue`` and ``drain()`` find it without arguments). It is
  a copy of a template migrated once per session (``CREATE DATABASE ... TEMPLATE``, a fraction of the
  cost of migrating), made in the background while the previous test ran and dropped in the
  background after it; the test's SQL may name jobq's tables unqualified.
- ``jobq_client``: a :class:`~jobqueue.Client` on it.
- ``jobq_eager``: every task enqueued during the test runs before ``enqueue`` returns (see :func:`eager`).
- ``jobq_server_url`` (session): the server the databases live on: ``JOBQ_TEST_DATABASE_URL``, else an
  embedded PostgreSQL kept under :func:`server_home` (initdb once, then only started per session).
  Override it in a conftest.py to share a server the project already starts.

``drain()`` runs the real runtime (a :class:`~jobqueue.runtime.worker.Worker` in burst mode) in this
process until nothing is runnable: the handlers, retries, dependencies and completion run exactly as in
production, only without waiting for a separate worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

from jobqueue.settings import Settings, get_settings

if TYPE_CHECKING:
    from jobqueue.client.sync import Client
    from jobqueue.runtime.worker import WorkerStats

T = TypeVar("T")


# ---------------------------------------------------------------- drain and eager


def _types(types: Sequence[str] | None) -> list[str]:
    from jobqueue import registry

    return list(types) if types else registry.known_types()


async def drain_async(types: Sequence[str] | None = None, *, url: str | None = None,
                      settings: Settings | None = None, concurrency: int = 10) -> WorkerStats:
    """:func:`drain` on the running event loop (an async test)."""
    from jobqueue.runtime.worker import Worker, WorkerStats

    names = _types(types)
    if not names:
        return WorkerStats()
    worker = Worker(names, burst=True, url=url, settings=settings or get_settings(), concurrency=concurrency,
                    maintenance=False)
    await worker.run()
    return worker.stats


def _run(coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end from sync code, also when that code is itself inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro()).result()


def drain(types: Sequence[str] | None = None, *, url: str | None = None, settings: Settings | None = None,
          concurrency: int = 10) -> WorkerStats:
    """Run every runnable task of `types` (default: every registered type) in this process until none is
    left, including the dependents their completion releases and retries that are due; returns what
    the worker did. Tasks scheduled for later stay queued."""
    return _run(lambda: drain_async(types, url=url, settings=settings, concurrency=concurrency))


@contextlib.contextmanager
def eager(types: Sequence[str] | None = None) -> Iterator[None]:
    """While active, a task enqueued on a client's own connection has run (through :func:`drain`) when
    ``enqueue``/``enqueue_many`` returns, so a unit test reads its result at once. A task enqueued in
    the caller's transaction (``connection=``) is not visible until that commits: it runs at the next
    eager enqueue or ``drain()``."""
    from jobqueue.client.aio import AsyncClient
    from jobqueue.client.sync import Client

    saved: list[tuple[type[Any], str, Any]] = []

    def patch(cls: type[Any], name: str, wrapper: Callable[..., Any]) -> None:
        saved.append((cls, name, cls.__dict__[name]))
        setattr(cls, name, wrapper)

    def sync_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        def run_at_once(self: Client, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            if kwargs.get("connection") is None:
                drain(types, url=self.url, settings=self.settings)
            return result
        return run_at_once

    def async_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        async def run_at_once(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
            result = await original(self, *args, **kwargs)
            if kwargs.get("connection") is None:
                await drain_async(types, url=self.url, settings=self.settings)
            return result
        return run_at_once

    for name in ("enqueue", "enqueue_many"):
        patch(Client, name, sync_wrapper(Client.__dict__[name]))
        patch(AsyncClient, name, async_wrapper(AsyncClient.__dict__[name]))
    try:
        yield
    finally:
        for cls, name, original in reversed(saved):
            setattr(cls, name, original)


# ---------------------------------------------------------------- databases


def database_url(server_url: str, name: str) -> str:
    return urlunsplit(urlsplit(server_url)._replace(path="/" + name))


def _admin(server_url: str, *commands: tuple[str, tuple[str, ...]]) -> None:
    """Run CREATE/ALTER/DROP DATABASE commands, each built by a statement of testing.sql."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn, psycopg.RawCursor(conn) as cur:
        for statement, params in commands:
            built = cur.execute(statement, params).fetchone()
            assert built is not None
            cur.execute(built[0])


def create_template(server_url: str, settings: Settings | None = None) -> str:
    """A new database migrated to head for the configured schema; returns its name."""
    from jobqueue.admin.migrate import migrate
    from jobqueue.db.queries import ServerSQL

    settings = settings or get_settings()
    name = f"jobq_tpl_{uuid.uuid4().hex[:12]}"
    _admin(server_url, (ServerSQL.load("").create_database, (name,)))
    migrate(database_url(server_url, name), settings.schema_name)
    return name


def clone_database(server_url: str, template: str, settings: Settings | None = None) -> str:
    """A fresh copy of `template` (the per-test set-up); returns its URL."""
    from jobqueue.db.queries import FixtureSQL

    settings = settings or get_settings()
    q = FixtureSQL.load("")
    name = f"jobq_test_{uuid.uuid4().hex[:12]}"
    _admin(server_url, (q.clone_database, (name, template)), (q.search_path, (name, settings.schema_name)))
    return database_url(server_url, name)


def drop_database(server_url: str, url: str) -> None:
    from jobqueue.db.queries import FixtureSQL

    _admin(server_url, (FixtureSQL.load("").drop_database, (urlsplit(url).path.lstrip("/"),)))


class Databases:
    """Test databases copied from one template, one ready ahead: a test's set-up takes the copy made
    while the previous test ran, and its database is dropped in the background after it.

    One background thread does the copying and dropping, copies first: a DROP DATABASE waits for a
    checkpoint, so drops are done when no copy is wanted (while tests run, or at the end).
    """

    _COPY, _DROP, _STOP = 0, 1, 2

    def __init__(self, server_url: str, template: str) -> None:
        self.server_url = server_url
        self.template = template
        self._work: queue.PriorityQueue[tuple[int, int, Callable[[], None]]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name="jobq-test-databases", daemon=True)
        self._thread.start()
        self._next = self._copy()

    def _run(self) -> None:
        while True:
            kind, _, job = self._work.get()
            if kind == self._STOP:
                return
            job()

    def _submit(self, kind: int, fn: Callable[[], T]) -> Future[T]:
        done: Future[T] = Future()

        def job() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to whoever waits on the future
                done.set_exception(exc)

        self._work.put((kind, next(self._seq), job))
        return done

    def _copy(self) -> Future[str]:
        return self._submit(self._COPY, lambda: clone_database(self.server_url, self.template))

    def take(self) -> str:
        """A fresh copy of the template (usually made already); the next one is started now."""
        ready, self._next = self._next, self._copy()
        return ready.result()

    def give_back(self, url: str) -> None:
        from jobqueue.client import wait

        wait.hub().forget(url)  # before the drop: waiters' LISTEN would reconnect to a dropped database
        self._submit(self._DROP, lambda: drop_database(self.server_url, url))

    def close(self) -> None:
        """Drop the spare copy, every pending drop, then the template."""
        with contextlib.suppress(Exception):
            self.give_back(self._next.result())
        self._work.put((self._STOP, next(self._seq), lambda: None))
        self._thread.join()
        drop_database(self.server_url, database_url(self.server_url, self.template))


@contextlib.contextmanager
def pointing_at(url: str) -> Iterator[None]:
    """JOBQ_DATABASE_URL is `url` meanwhile; the cached settings and default client follow it."""
    from jobqueue.client import sync

    old = os.environ.get("JOBQ_DATABASE_URL")
    os.environ["JOBQ_DATABASE_URL"] = url
    get_settings.cache_clear()
    sync._default = None  # jobqueue.enqueue()'s client was built for the previous database
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JOBQ_DATABASE_URL", None)
        else:
            os.environ["JOBQ_DATABASE_URL"] = old
        get_settings.cache_clear()
        if sync._default is not None:
            sync._default.close()
        sync._default = None


# ---------------------------------------------------------------- fixtures


def start_server(home: Path) -> tuple[str, bool]:
    """The plugin's embedded server under `home`, started if needed and made fast rather than durable
    (its databases are thrown away); returns its URL and whether this call started it."""
    import psycopg

    from jobqueue.admin import embedded
    from jobqueue.db.queries import FixtureSQL

    started = embedded.read_running(embedded.pgdata_dir(home)) is None
    url = embedded.ensure_running(home).url("postgres")
    if started:
        q = FixtureSQL.load("")
        with psycopg.connect(url, autocommit=True) as conn, psycopg.RawCursor(conn) as cur:
            for statement in (q.not_durable, q.no_sync_commit, q.reload):
                cur.execute(statement)
    return url, started


def server_home() -> Path:
    """Where the plugin keeps its embedded server: kept between sessions, so only the first ever pays
    for initdb (JOBQ_TEST_HOME, else a ``pytest`` folder in jobq's home)."""
    from jobqueue.settings import default_home

    return Path(os.environ.get("JOBQ_TEST_HOME") or default_home() / "pytest")


@pytest.fixture(scope="session")
def jobq_server_url() -> Iterator[str]:
    """The server test databases live on: JOBQ_TEST_DATABASE_URL, else the plugin's embedded PostgreSQL
    (started if needed, and stopped at the end of a session that started it)."""
    external = os.environ.get("JOBQ_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from jobqueue.admin import embedded

    home = server_home()
    url, started = start_server(home)
    try:
        yield url
    finally:
        if started:
            embedded.stop(home)


@pytest.fixture(scope="session")
def jobq_databases(jobq_server_url: str) -> Iterator[Databases]:
    """The template, migrated once per session, and the copies made from it."""
    databases = Databases(jobq_server_url, create_template(jobq_server_url))
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture
def jobq_url(jobq_databases: Databases) -> Iterator[str]:
    """A migrated database of this test's own; JOBQ_DATABASE_URL points at it during the test."""
    url = jobq_databases.take()
    try:
        with pointing_at(url):
            yield url
    finally:
        jobq_databases.give_back(url)


@pytest.fixture
def jobq_client(jobq_url: str) -> Iterator[Client]:
    from jobqueue.client.sync import Client

    with Client(jobq_url) as client:
        yield client


@pytest.fixture
def jobq_eager(jobq_url: str) -> Iterator[None]:
    """Tasks enqueued during the test run at once, on the test's database."""
    with eager():
        yield


__all__ = ["Databases", "clone_database", "create_template", "drain", "drain_async", "drop_database", "eager",
           "server_home", "start_server"]
