"""Queue and bulk control (issue 14): pause, resume, cap; cancel, retry and prioritise by selector;
back-pressure from an HTTP server's Retry-After; paused, capped and unserved queues in the views."""

from __future__ import annotations

import asyncio
import email.message
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import psycopg
import pytest
from support import REPO, SCHEMA, BackgroundWorker, jobq_cli, one, status, wait_for

from jobqueue import AsyncClient, Client, Context, Snooze, raise_for_backpressure, retry_after_seconds, task
from jobqueue.errors import InvalidPayload, InvalidTransition, TaskNotFound

GATE = threading.Event()
STARTED: list[int] = []


@task("ctl_gate", max_retries=0)
async def ctl_gate(ctx: Context, payload: Any) -> Any:
    """Runs until the test opens the gate (or the task is cancelled)."""
    STARTED.append(ctx.id)
    while not GATE.is_set():
        await asyncio.sleep(0.01)
    return None


@task("ctl_fail", max_retries=0)
async def ctl_fail(ctx: Context, payload: Any) -> Any:
    raise RuntimeError("boom")


@pytest.fixture
def gate(clean: None) -> Iterator[threading.Event]:
    GATE.clear()
    STARTED.clear()
    yield GATE
    GATE.set()


def statuses(conn: psycopg.Connection[Any], ids: list[int]) -> list[str]:
    return [status(conn, i) for i in ids]


# ---------------------------------------------------------------- queue control


def test_pause_holds_new_claims_and_leaves_running_tasks_alone(client: Client, conn: psycopg.Connection[Any],
                                                               gate: threading.Event) -> None:
    first = client.enqueue("ctl_gate")
    with BackgroundWorker(["ctl_gate"], concurrency=4, poll_seconds=0.2):
        wait_for(lambda: status(conn, first) == "running")
        client.pause("ctl_gate")
        later = client.enqueue_many("ctl_gate", [{}, {}])  # their NOTIFY wakes the worker: it claims nothing
        time.sleep(1.0)  # five polls and a wake-up: every claim cycle since the pause skipped the type
        assert statuses(conn, later) == ["queued", "queued"]
        assert status(conn, first) == "running"  # the pause did not touch the running task
        gate.set()
        wait_for(lambda: status(conn, first) == "done")
        time.sleep(0.5)
        assert statuses(conn, later) == ["queued", "queued"]
        [q] = [q for q in client.queues() if q.type == "ctl_gate"]
        assert q.paused and q.queued == 2 and q.workers == 1 and q.served
        client.resume("ctl_gate")
        wait_for(lambda: statuses(conn, later) == ["done", "done"], timeout=10)
    assert not one(conn, "SELECT paused FROM queues WHERE type = 'ctl_gate'")


def test_cap_limits_running_tasks_across_the_cluster(client: Client, conn: psycopg.Connection[Any],
                                                     gate: threading.Event) -> None:
    client.cap("ctl_gate", 1)
    ids = client.enqueue_many("ctl_gate", [{}, {}, {}])
    with BackgroundWorker(["ctl_gate"], concurrency=3, poll_seconds=0.2):
        wait_for(lambda: len(STARTED) == 1)
        time.sleep(0.8)
        assert len(STARTED) == 1 and sorted(statuses(conn, ids)).count("running") == 1
        [q] = [q for q in client.queues() if q.type == "ctl_gate"]
        assert q.max_running == 1 and q.running == 1 and q.queued == 2
        client.uncap("ctl_gate")  # wakes the worker: the other two start without waiting for the first
        wait_for(lambda: len(STARTED) == 3, timeout=10)
        gate.set()
        wait_for(lambda: statuses(conn, ids) == ["done"] * 3)
    assert one(conn, "SELECT max_running FROM queues WHERE type = 'ctl_gate'") is None


def test_queue_commands(conn: psycopg.Connection[Any], clean: None) -> None:
    for args in (("pause", "ctl_gate"), ("cap", "ctl_gate", "5"), ("pause", "nobody_serves")):
        res = jobq_cli("queue", *args)
        assert res.returncode == 0, res.stderr
    conn.execute("INSERT INTO tasks (type) VALUES ('nobody_serves'), ('typo_type')")
    res = jobq_cli("queue", "ls")
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    assert "paused" in lines["ctl_gate"] and "5" in lines["ctl_gate"]
    assert "no worker" in lines["typo_type"] and "paused" not in lines["typo_type"]
    assert "paused" in lines["nobody_serves"]
    assert jobq_cli("queue", "resume", "ctl_gate").returncode == 0
    assert jobq_cli("queue", "uncap", "ctl_gate").returncode == 0
    assert conn.execute("SELECT paused, max_running FROM queues WHERE type = 'ctl_gate'").fetchone() == (False, None)
    for bad, says in ((("cap", "ctl_gate", "--", "-1"), "max_running must be 0 or more"),
                      (("pause", "bad type!"), "task type name"), (("cap", "ctl_gate", "x"), "Invalid value for 'n'")):
        res = jobq_cli("queue", *bad)
        assert res.returncode != 0 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert conn.execute("SELECT max_running FROM queues WHERE type = 'ctl_gate'").fetchone() == (None,)


# ---------------------------------------------------------------- bulk control by selector


def test_cancel_by_selector_reaches_queued_and_running_tasks(client: Client, conn: psycopg.Connection[Any],
                                                              gate: threading.Event) -> None:
    running = client.enqueue("ctl_gate", owner="acme")
    with BackgroundWorker(["ctl_gate"], concurrency=1, poll_seconds=0.2, heartbeat_seconds=30):
        wait_for(lambda: status(conn, running) == "running")
        queued = [client.enqueue("ctl_gate", owner="acme") for _ in range(3)]
        other = client.enqueue("ctl_gate", owner="bob")
        parent = client.enqueue("ctl_fail", owner="acme")
        child = client.enqueue("ctl_fail", owner="zed", depends_on=[parent])
        # only the queued ones: the running task and bob's are not selected
        result = client.cancel_where(owner="acme", status="queued", type="ctl_gate")
        assert result == dict.fromkeys(queued, "cancelled")
        assert status(conn, running) == "running" and status(conn, other) == "queued"
        # every live task of acme: the running one hears it by NOTIFY (the heartbeat is 30 s away)
        result = client.cancel_where(owner="acme")
        assert result == {running: "running", parent: "cancelled"}
        wait_for(lambda: status(conn, running) == "cancelled", timeout=5)
        assert status(conn, child) == "cancelled"  # a cancelled parent's waiting descendants, as cancel does
        assert status(conn, other) in ("queued", "running")  # bob's task is not touched (it may start now)
        gate.set()  # bob's task ends, so the worker stops at once instead of after its drain timeout
    assert client.cancel_where(owner="acme") == {}  # nothing live matches any more


def test_a_selector_is_required_and_statuses_are_checked(client: Client, clean: None) -> None:
    with pytest.raises(InvalidPayload, match="needs a selector"):
        client.cancel_where()
    with pytest.raises(InvalidPayload, match="needs a selector"):
        client.retry_where()
    with pytest.raises(InvalidPayload, match="needs a selector"):
        client.prioritize(priority=3)
    with pytest.raises(InvalidPayload, match="cannot cancel 'done' tasks"):
        client.cancel_where(status="done")
    with pytest.raises(InvalidPayload, match="cannot retry 'queued' tasks"):
        client.retry_where(type="x", status="queued")
    tid = client.enqueue("ctl_gate")
    assert client.cancel_where(type="ctl_gate", owner="nobody") == {}
    assert client.get(tid).status == "queued"
    res = jobq_cli("cancel")
    assert res.returncode != 0 and "task ids, --doc" in res.stderr
    res = jobq_cli("cancel", "--owner", "nobody")
    assert res.returncode == 0 and "no live task matches --owner nobody" in res.stdout, res.stdout + res.stderr
    res = jobq_cli("cancel", "--status", "finished")
    assert res.returncode != 0 and "cannot cancel 'finished' tasks" in res.stderr
    res = jobq_cli("cancel", str(tid), "--owner", "x")
    assert res.returncode != 0 and "not both" in res.stderr
    assert client.get(tid).status == "queued"


def test_retry_by_selector(client: Client, conn: psycopg.Connection[Any], clean: None) -> None:
    failed = client.enqueue_many("ctl_fail", [{}, {}])
    keep = client.enqueue("ctl_gate")
    client.cancel(keep)
    with BackgroundWorker(["ctl_fail"], burst=True) as w:
        w.thread.join(20)
    assert statuses(conn, failed) == ["failed", "failed"]
    res = jobq_cli("retry", "--type", "ctl_fail", "--status", "failed")
    assert res.returncode == 0, res.stderr
    assert all(f"{i}: queued" in res.stdout for i in failed)
    assert statuses(conn, failed) == ["queued", "queued"] and status(conn, keep) == "cancelled"
    assert [one(conn, "SELECT retry_count FROM tasks WHERE id = %s", i) for i in failed] == [0, 0]
    assert client.retry_where(type="ctl_fail") == {}
    res = jobq_cli("retry", "--type", "ctl_fail")
    assert res.returncode == 0 and "no failed or cancelled task matches --type ctl_fail" in res.stdout


def test_prioritized_document_is_claimed_next(client: Client, conn: psycopg.Connection[Any],
                                              gate: threading.Event) -> None:
    blocker = client.enqueue("ctl_gate", priority=100)
    backlog = client.enqueue_many("ctl_gate", [{} for _ in range(5)])
    doc = one(conn, "INSERT INTO documents (name, size, format, kind, parser, pages, content_digest, uri) "
                    "VALUES ('d.txt', 1, 'txt', 'text', 'general', 1, 'x', '/d.txt') RETURNING id")
    urgent = [client.enqueue("ctl_gate", doc_id=doc) for _ in range(2)]
    with BackgroundWorker(["ctl_gate"], concurrency=1, poll_seconds=0.2):
        wait_for(lambda: [blocker] == STARTED)
        res = jobq_cli("prioritize", "--doc", str(doc), "10")
        assert res.returncode == 0 and "2 task(s)" in res.stdout, res.stdout + res.stderr
        gate.set()
        wait_for(lambda: len(STARTED) == 8, timeout=15)
    # the next claims after the blocker took the document's tasks, ahead of the older backlog
    assert STARTED[1:3] == urgent and STARTED[3:] == backlog


def test_prioritize_by_id_says_why_nothing_changed(client: Client, conn: psycopg.Connection[Any],
                                                   clean: None) -> None:
    a, b = client.enqueue("ctl_gate"), client.enqueue("ctl_gate")
    assert client.prioritize([a, b], priority=7) == [a, b]
    assert [client.get(i).priority for i in (a, b)] == [7, 7]
    res = jobq_cli("prioritize", str(a), "9")
    assert res.returncode == 0 and client.get(a).priority == 9, res.stderr
    client.cancel(a)
    with pytest.raises(InvalidTransition, match="is cancelled"):
        client.prioritize(a, priority=1)
    with pytest.raises(TaskNotFound):
        client.prioritize(999_999, priority=1)
    res = jobq_cli("prioritize", str(b), "99999999999")
    assert res.returncode != 0 and "32 bits" in res.stderr
    res = jobq_cli("prioritize", "--owner", "nobody", "3")
    assert res.returncode == 0 and "no queued or waiting task matches --owner nobody" in res.stdout


def test_async_client_controls(db_url: str, conn: psycopg.Connection[Any], clean: None) -> None:
    async def go() -> None:
        async with AsyncClient(db_url) as c:
            ids = [await c.enqueue("ctl_gate", owner="a") for _ in range(2)]
            await c.pause("ctl_gate")
            await c.cap("ctl_gate", 2)
            [q] = [q for q in await c.queues() if q.type == "ctl_gate"]
            assert (q.paused, q.max_running, q.queued, q.workers) == (True, 2, 2, 0)
            assert await c.prioritize(owner="a", priority=4) == ids
            assert await c.cancel_where(owner="a", status=["queued"]) == dict.fromkeys(ids, "cancelled")
            assert await c.retry_where(owner="a") == dict.fromkeys(ids, "queued")
            await c.resume("ctl_gate")
            await c.uncap("ctl_gate")
            with pytest.raises(InvalidPayload, match="needs a selector"):
                await c.cancel_where()

    asyncio.run(go())
    assert conn.execute("SELECT paused, max_running FROM queues WHERE type = 'ctl_gate'").fetchone() == (False, None)


# ---------------------------------------------------------------- back-pressure from APIs


def test_retry_after_values() -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=90), usegmt=True), now=now) == 0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    assert Snooze.from_retry_after("7").seconds == 7
    assert Snooze.from_retry_after("86400").seconds == 3600  # capped
    assert Snooze.from_retry_after(None, default=12).seconds == 12
    # 429 always snoozes (the default wait without the header); 503 only with a Retry-After
    with pytest.raises(Snooze) as caught:
        raise_for_backpressure(429, {"retry-after": "5"})  # any case in a plain dict
    assert caught.value.seconds == 5 and "Retry-After '5'" in str(caught.value)
    with pytest.raises(Snooze) as caught:
        raise_for_backpressure(429, None)
    assert caught.value.seconds == 30
    with pytest.raises(Snooze):
        raise_for_backpressure(503, _headers({"retry-after": "2"}))
    raise_for_backpressure(503, {})  # an outage, not a rate limit: the caller's error path
    raise_for_backpressure(500, {"Retry-After": "2"})
    raise_for_backpressure(200, {})


def _headers(values: dict[str, str]) -> Any:
    """Response headers as http.client gives them (case-insensitive, with get_all)."""
    message = email.message.Message()
    for k, v in values.items():
        message[k] = v
    return message


class _RateLimited(BaseHTTPRequestHandler):
    hits = 0

    def do_POST(self) -> None:
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"error": "rate limited"}'
        self.send_response(429)
        self.send_header("Retry-After", "40")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def rate_limited_server() -> Iterator[str]:
    _RateLimited.hits = 0
    httpd = HTTPServer(("127.0.0.1", 0), _RateLimited)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_raptor_snoozes_for_the_model_servers_retry_after(conn: psycopg.Connection[Any], clean: None,
                                                          rate_limited_server: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from jobq_workers.documents import enqueue_files

    res = enqueue_files([str(REPO / "examples" / "samples" / "handbook.pdf")], then="raptor").files[0]
    with BackgroundWorker(["dataflow"], concurrency=2, poll_seconds=0.2):
        wait_for(lambda: status(conn, res.then_task) == "queued", timeout=90)
    monkeypatch.setenv("JOBQ_EMBED_URL", rate_limited_server)
    with BackgroundWorker(["raptor"], poll_seconds=0.2):
        wait_for(lambda: one(conn, "SELECT attempt FROM tasks WHERE id = %s", res.then_task) == 1
                 and status(conn, res.then_task) == "queued", timeout=60)
    row = conn.execute("SELECT retry_count, extract(epoch FROM run_at - now()), status, last_error "
                       "FROM tasks WHERE id = %s", (res.then_task,)).fetchone()
    assert _RateLimited.hits == 1
    assert row[0] == 0 and row[2] == "queued"  # snoozed: no retry spent
    assert 30 < row[1] <= 40  # run_at ~ now + Retry-After (less the seconds the test took since)


# ---------------------------------------------------------------- visibility


def test_views_show_paused_capped_and_unserved_queues(client: Client, conn: psycopg.Connection[Any],
                                                      clean: None) -> None:
    from jobqueue.cli.top import render_text
    from jobqueue.observe.snapshot import fetch


    client.enqueue("ctl_gate")
    conn.execute("INSERT INTO tasks (type) VALUES ('typo_gate')")  # plain SQL: a type no worker serves
    client.pause("ctl_gate")
    client.cap("ctl_gate", 3)
    client.cap("idle_type", 2)  # capped, nothing queued: still listed
    conn.execute("INSERT INTO workers (id, host, pid, types, concurrency) VALUES ('w1', 'h', 1, '{ctl_gate}', 1)")
    depth = {r[0]: r[1:] for r in conn.execute("SELECT type, paused, max_running, served FROM queue_depth")}
    assert depth == {"ctl_gate": (True, 3, True), "typo_gate": (False, None, False)}
    state = {q.type: q for q in client.queues()}
    assert set(state) == {"ctl_gate", "typo_gate", "idle_type"}
    assert not state["typo_gate"].served and state["typo_gate"].queued == 1
    assert state["idle_type"].max_running == 2 and state["idle_type"].queued == 0
    snap = fetch(conn, SCHEMA)
    frame = render_text(snap)
    assert "ctl_gate (paused, cap 3)" in frame and "typo_gate (no worker)" in frame and "idle_type (cap 2)" in frame
    res = jobq_cli("ls")
    assert res.returncode == 0 and "typo_gate" in res.stdout
    assert "1 queued task(s) of type typo_gate: no live worker serves it" in " ".join(res.stdout.split())
    assert "ctl_gate is paused" in " ".join(res.stdout.split())
    from prometheus_client.core import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from jobqueue.observe.exporter import ViewsCollector

    registry = CollectorRegistry()
    collector = ViewsCollector(conn.info.dsn, SCHEMA)
    registry.register(collector)
    text = generate_latest(registry).decode()
    collector.close()
    assert 'jobq_cluster_queue_max_running{type="ctl_gate"} 3.0' in text
    assert 'jobq_cluster_queue_workers{type="typo_gate"} 0.0' in text
    assert 'jobq_cluster_queue_paused{type="ctl_gate"} 1.0' in text


def test_0008_goes_down_and_up_keeping_queue_depth_grants(server_url: str) -> None:
    """queue_depth gains its columns in place; going down re-creates it without them, and a role's grant
    on it survives both ways; the selector functions and queue_state come and go with the revision."""
    import uuid

    from alembic import command
    from support import create_database, drop_database

    from jobqueue.admin.migrate import alembic_config, migrate

    url = create_database(server_url)
    role = f"jobq_m8_{uuid.uuid4().hex[:6]}"

    def state() -> tuple[int, bool, bool]:
        with psycopg.connect(url) as c:
            columns = one(c, "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s "
                             "AND table_name = 'queue_depth' AND column_name IN ('max_running', 'served')", SCHEMA)
            granted = one(c, "SELECT has_table_privilege(%s, %s, 'SELECT')", role, f'"{SCHEMA}".queue_depth')
            functions = one(c, "SELECT to_regclass(%s) IS NOT NULL AND to_regproc(%s) IS NOT NULL",
                            f'"{SCHEMA}".queue_state', f'"{SCHEMA}".matching_tasks')
        return int(columns), bool(granted), bool(functions)

    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f'CREATE ROLE "{role}"')
            c.execute(f'GRANT SELECT ON "{SCHEMA}".queue_depth TO "{role}"')
        assert state() == (2, True, True)
        command.downgrade(alembic_config(url), "0006")
        assert state() == (0, True, False)
        migrate(url)
        assert state() == (2, True, True)
    finally:
        drop_database(server_url, url)
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f'DROP ROLE IF EXISTS "{role}"')
