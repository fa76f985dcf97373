"""Flow control in the claim (issue 14), on a real PostgreSQL: fair claims, per-key concurrency limits
(also across worker processes killed with SIGKILL and rescued), cluster-wide rate limits, the
declarations' checks and the flow_control view. Rules are proven by what the claim returns and by
the rows' started/finished intervals; the one bound in seconds (a held key woken by a task's end on
another worker) is half of what the worker's own timer gives without the wake-up."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import asyncpg
import flow_handlers  # noqa: F401  (registers the f_* types)
import psycopg
import pytest
from support import REPO, SCHEMA, BackgroundWorker, one, status, wait_for

from jobqueue import Client, TaskSpec, task
from jobqueue.db.queries import RuntimeSQL
from jobqueue.errors import ConfigurationError
from jobqueue.registry import get_type, unregister
from jobqueue.runtime.worker import Worker


@pytest.fixture
def reset(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE tasks, workers, queues, flow_rules, flow_grants RESTART IDENTITY CASCADE")


def claim(db_url: str, task_type: str, n: int, *, worker: str = "w-test", declare: bool = False) -> list[Any]:
    """One claim of up to `n` tasks of `task_type` by a worker's fetcher (the worker is not started)."""

    async def go() -> list[Any]:
        w = Worker([task_type], url=db_url, name=worker, concurrency=64, lease_seconds=60)
        conn = await asyncpg.connect(db_url)
        try:
            if declare:
                await w.flow.declare(conn, w.id)
            return list(await w.fetcher._claim(conn, {task_type: n}, n))
        finally:
            await conn.close()

    return asyncio.run(go())


def add(client: Client, task_type: str, n: int, payload: Any = None, **spec: Any) -> list[int]:
    """`n` tasks of one type and spec (owner, priority...) in one batch."""
    return client.enqueue_many(task_type, [TaskSpec(payload=payload or {}, **spec) for _ in range(n)])


def owners(rows: list[Any]) -> collections.Counter[str]:
    return collections.Counter(r["owner"] for r in rows)


def finish(conn: psycopg.Connection[Any], rows: list[Any]) -> None:
    conn.execute("UPDATE tasks SET status = 'done', finished_at = now(), lease_expires_at = NULL WHERE id = ANY(%s)",
                 ([r["id"] for r in rows],))


# ------------------------------------------------------------------ declarations


@pytest.mark.parametrize(("options", "says"), [
    ({"rate": "fast"}, "rate='fast' is not a rate"),
    ({"rate": "0/s"}, "is not a rate"),
    ({"limit_by": "owner", "limit": 0}, "limit must be a whole number of at least 1"),
    ({"limit_by": "owner", "limit": True}, "limit must be a whole number"),
    ({"fair_by": "tenant"}, "fair_by='tenant' is not a key"),
    ({"limit_by": "payload.", "limit": 2}, "is not a key"),
    ({"fair_by": "owner", "limit_by": "doc_id", "limit": 2}, "must name the same key"),
    ({"limit": 3}, "limit and limit_by go together"),
    ({"rate_by": "owner"}, "rate_by needs a rate"),
])
def test_bad_declarations_are_refused_at_registration(options: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        task("f_bad", **options)(lambda ctx, payload: None)
    assert says in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(Exception, match="unknown task type"):
        get_type("f_bad")


def test_good_declarations_are_parsed() -> None:
    try:
        task("f_good", fair_by="payload.tenant", limit_by="payload.tenant", limit=4, rate="10/5s",
             rate_by="payload.tenant")(lambda ctx, payload: None)
        flow = get_type("f_good").flow
        assert flow is not None
        assert (flow.key, flow.fair, flow.limit, flow.rate, flow.rate_seconds, flow.rate_by_key) == (
            "payload.tenant", True, 4, 10, 5.0, True)
        assert get_type("f_plain").flow is None
    finally:
        unregister("f_good")


# ------------------------------------------------------------------ fair claims


def test_fair_claim_takes_turns_across_keys(client: Client, db_url: str, reset: None) -> None:
    add(client, "f_fair", 10, {}, owner="a")
    add(client, "f_fair", 2, {}, owner="b")
    client.enqueue("f_fair", {}, owner="c")
    assert owners(claim(db_url, "f_fair", 6)) == {"a": 3, "b": 2, "c": 1}
    # Without a declaration the same backlog is claimed oldest first.
    add(client, "f_plain", 10, {}, owner="a")
    client.enqueue("f_plain", {}, owner="b")
    assert owners(claim(db_url, "f_plain", 6)) == {"a": 6}


def test_fair_claim_puts_a_key_with_nothing_running_first(client: Client, db_url: str, reset: None) -> None:
    add(client, "f_fair", 100, {}, owner="a")
    assert owners(claim(db_url, "f_fair", 8)) == {"a": 8}  # all slots busy with tenant a
    late = client.enqueue("f_fair", {}, owner="b")
    rows = claim(db_url, "f_fair", 1)
    assert [r["id"] for r in rows] == [late]


def test_priority_wins_over_fairness(client: Client, db_url: str, reset: None) -> None:
    add(client, "f_fair", 3, {}, owner="a", priority=5)
    add(client, "f_fair", 3, {}, owner="b")
    rows = claim(db_url, "f_fair", 3)
    assert owners(rows) == {"a": 3}
    assert {r["priority"] for r in rows} == {5}


def test_the_flow_claim_returns_the_trace_context(client: Client, db_url: str, conn: psycopg.Connection[Any],
                                                  reset: None) -> None:
    """Like the plain claim: the attempt's span is the enqueueing span's child (jobqueue.tracing)."""
    tid = client.enqueue("f_fair", {}, owner="a")
    context = '{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}'
    conn.execute("UPDATE tasks SET trace_context = %s::jsonb WHERE id = %s", (context, tid))
    (row,) = claim(db_url, "f_fair", 1, declare=True)
    assert row["trace_context"] is not None and '"traceparent"' in row["trace_context"]


def test_fair_by_a_payload_field(client: Client, db_url: str, reset: None) -> None:
    add(client, "f_tenant", 10, {"tenant": "x"})
    add(client, "f_tenant", 2, {"tenant": "y"})
    client.enqueue("f_tenant", {})  # no tenant: the key ''
    rows = claim(db_url, "f_tenant", 5)
    import json
    assert collections.Counter(json.loads(r["payload"]).get("tenant", "") for r in rows) == {"x": 2, "y": 2, "": 1}


def test_declare_builds_the_key_index_the_claim_uses(client: Client, db_url: str, conn: psycopg.Connection[Any],
                                                    reset: None) -> None:
    add(client, "f_fair", 3000, {}, owner="a")
    add(client, "f_fair", 3, {}, owner="b")
    conn.execute("ANALYZE tasks")
    assert owners(claim(db_url, "f_fair", 2, declare=True)) == {"a": 1, "b": 1}
    index = one(conn, "SELECT index_name FROM flow_rules WHERE type = 'f_fair'")
    assert one(conn, "SELECT count(*) FROM pg_indexes WHERE schemaname = %s AND indexname = %s", SCHEMA, index) == 1

    def scans() -> int:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(one(conn, "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s", index))

    assert wait_for(scans, timeout=30, interval=0.2) > 0  # the claim's skip scan and per-key scans
    # A worker whose type has no declaration any more forgets it (and its index).
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("SELECT declare_flow('f_fair', NULL, false, NULL, NULL, NULL, false, 'w')")
    assert one(conn, "SELECT count(*) FROM flow_rules") == 0
    assert one(conn, "SELECT count(*) FROM pg_indexes WHERE schemaname = %s AND indexname = %s", SCHEMA, index) == 0


# ------------------------------------------------------------------ per-key limits


def test_limit_per_key_holds_across_claims(client: Client, db_url: str, conn: psycopg.Connection[Any],
                                           reset: None) -> None:
    add(client, "f_limited", 5, {}, owner="a")
    add(client, "f_limited", 5, {}, owner="b")
    first = claim(db_url, "f_limited", 10, worker="w1", declare=True)
    assert owners(first) == {"a": 2, "b": 2}
    assert claim(db_url, "f_limited", 10, worker="w2") == []  # another worker: still at the limit
    view = {r[0]: r[1:] for r in conn.execute(
        "SELECT key, running, queued, held_by, held_back FROM flow_control WHERE type = 'f_limited'")}
    assert view == {"a": (2, 3, "limit", 3), "b": (2, 3, "limit", 3)}
    finish(conn, [r for r in first if r["owner"] == "a"][:1])
    assert owners(claim(db_url, "f_limited", 10, worker="w2")) == {"a": 1}


def test_limit_counts_tasks_of_a_dead_worker_until_rescued(client: Client, db_url: str,
                                                           conn: psycopg.Connection[Any], reset: None) -> None:
    add(client, "f_limited", 4, {}, owner="a")
    assert len(claim(db_url, "f_limited", 4, worker="dead")) == 2
    conn.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 s' WHERE status = 'running'")
    assert claim(db_url, "f_limited", 4) == []  # expired but not yet rescued: still running
    conn.execute("UPDATE tasks SET status = 'queued', worker_id = NULL, lease_expires_at = NULL "
                 "WHERE status = 'running'")  # what the rescuer does to an expired lease
    assert len(claim(db_url, "f_limited", 4)) == 2


@pytest.mark.parametrize("limit_type,limit", [("f_limited", 2), ("f_fair_limited", 3)])
def test_limit_never_exceeded_by_several_workers_killed_and_rescued(
        client: Client, db_url: str, conn: psycopg.Connection[Any], reset: None, limit_type: str, limit: int,
        procs: list[subprocess.Popen[str]]) -> None:
    per_owner = 12
    for owner in ("a", "b", "c"):
        add(client, limit_type, per_owner, {"s": 0.05}, owner=owner)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JOBQ_LEASE_SECONDS": "1.5", "JOBQ_HEARTBEAT_SECONDS": "0.3"}

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "jobqueue", "worker", "--types", limit_type, "--import",
                                 "flow_handlers", "--concurrency", "4", "--poll", "0.1"],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)

    procs.extend(start() for _ in range(3))  # the procs fixture kills them at the end
    # The victim is a worker that runs tasks now: they stay 'running' until the rescuer requeues them.
    busy = wait_for(lambda: one(conn, "SELECT min(split_part(worker_id, ':', 2))::int FROM tasks "
                                      "WHERE status = 'running'"), timeout=60)
    victim = next(p for p in procs if p.pid == busy)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    procs.append(start())
    wait_for(lambda: one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 3 * per_owner,
             timeout=120, interval=0.1)
    # The most tasks of one owner that were ever running at once, from the rows' intervals.
    worst = one(conn, """
        WITH ev AS (
            SELECT owner, started_at AS at, 1 AS d FROM tasks WHERE type = %s
            UNION ALL SELECT owner, finished_at, -1 FROM tasks WHERE type = %s
        )
        SELECT max(running) FROM (
            SELECT sum(d) OVER (PARTITION BY owner ORDER BY at, d) AS running FROM ev) s""", limit_type, limit_type)
    assert 1 <= worst <= limit
    assert one(conn, "SELECT count(*) FROM tasks WHERE requeue_reason = 'lost'") >= 1  # rescued, then run


def test_a_key_held_by_its_limit_starts_when_its_task_ends_on_another_worker(
        client: Client, db_url: str, conn: psycopg.Connection[Any], reset: None) -> None:
    """The held worker polls every 60 s, and its timer for a runnable task it may not take has backed
    off (5 ms doubling: the pending one fires about 5 s after it started); only the completer's NOTIFY
    on the finished channel can start the key's next task within a second of the other's end."""
    add(client, "f_limited", 2, {}, owner="a")
    elsewhere = claim(db_url, "f_limited", 2, worker="elsewhere", declare=True)
    waiting = client.enqueue("f_limited", {}, owner="a")
    with BackgroundWorker(["f_limited"], url=db_url, concurrency=4, poll_seconds=60):
        time.sleep(3)
        assert status(conn, waiting) == "queued"  # a held at its limit of 2
        first = elsewhere[0]["id"]
        owner_id = one(conn, "SELECT worker_id FROM tasks WHERE id = %s", first)

        async def complete() -> None:  # the other worker's completer, as it commits
            c = await asyncpg.connect(db_url)
            try:
                await c.fetch(RuntimeSQL.load(SCHEMA).complete_many, [first], [1], ["null"], ["done"], 4000, owner_id,
                              False)
            finally:
                await c.close()

        asyncio.run(complete())
        wait_for(lambda: status(conn, waiting) != "queued", timeout=15)
    lag = one(conn, "SELECT extract(epoch FROM w.started_at - f.finished_at)::float8 FROM tasks w, tasks f "
                    "WHERE w.id = %s AND f.id = %s", waiting, first)
    assert lag < 1.0, lag


# ------------------------------------------------------------------ rate limits


def test_type_wide_rate_limit_and_its_wait(client: Client, db_url: str, conn: psycopg.Connection[Any],
                                          reset: None) -> None:
    add(client, "f_rate", 5, {}, owner="a")
    add(client, "f_rate", 5, {}, owner="b")
    assert len(claim(db_url, "f_rate", 10, declare=True)) == 3  # rate 3/m
    assert claim(db_url, "f_rate", 10, worker="w2") == []
    rows = conn.execute("SELECT held_by, rate_used, wait_seconds FROM flow_control WHERE type = 'f_rate'").fetchall()
    assert rows and all(r[0] == "rate" and r[1] == 3 and 0 < r[2] <= 60 for r in rows)
    # The window slides: grants older than a minute no longer count (and are pruned by the next claim).
    conn.execute("UPDATE flow_grants SET at = at - interval '61 s'")
    assert len(claim(db_url, "f_rate", 10)) == 3
    assert one(conn, "SELECT sum(n) FROM flow_grants") == 3


def test_a_claim_cut_short_by_a_rate_knows_when_the_window_frees(client: Client, db_url: str,
                                                                  reset: None) -> None:
    add(client, "f_rate", 5, {})

    async def go() -> tuple[int, float | None, int, float | None]:
        w = Worker(["f_rate"], url=db_url, name="w-wait", concurrency=8, lease_seconds=60)
        conn = await asyncpg.connect(db_url)
        try:
            first = await w.flow.claim(conn, {"f_rate": 2}, 2, w.id, 60)
            wake_first = w.flow.wake_in
            second = await w.flow.claim(conn, {"f_rate": 8}, 8, w.id, 60)
            return len(first), wake_first, len(second), w.flow.wake_in
        finally:
            await conn.close()

    got, wake, cut, wake_cut = asyncio.run(go())
    assert (got, wake) == (2, None)  # all it asked for: no timer
    assert cut == 1  # 3/m: one start left in the window
    assert wake_cut is not None and 55 < wake_cut <= 60  # the window frees its first start in ~a minute


def test_rate_limit_per_key(client: Client, db_url: str, reset: None) -> None:
    add(client, "f_rate_by", 5, {}, owner="a")
    add(client, "f_rate_by", 5, {}, owner="b")
    assert owners(claim(db_url, "f_rate_by", 10)) == {"a": 2, "b": 2}  # 2/m per owner
    assert claim(db_url, "f_rate_by", 10) == []
    client.enqueue("f_rate_by", {}, owner="c")
    assert owners(claim(db_url, "f_rate_by", 10)) == {"c": 1}


# ------------------------------------------------------------------ queues and whole runs


def test_paused_and_capped_queues_hold_for_flow_types(client: Client, db_url: str, conn: psycopg.Connection[Any],
                                                      reset: None) -> None:
    add(client, "f_fair", 5, {}, owner="a")
    conn.execute("INSERT INTO queues (type, paused) VALUES ('f_fair', true)")
    assert claim(db_url, "f_fair", 5) == []
    conn.execute("UPDATE queues SET paused = false, max_running = 2 WHERE type = 'f_fair'")
    assert len(claim(db_url, "f_fair", 5)) == 2


def test_a_worker_runs_flow_types_to_the_end(client: Client, db_url: str, conn: psycopg.Connection[Any],
                                             reset: None) -> None:
    from support import BackgroundWorker

    for owner in ("a", "b"):
        add(client, "f_fair_limited", 20, {}, owner=owner)
    add(client, "f_plain", 5, {})
    with BackgroundWorker(["f_fair_limited", "f_plain"], concurrency=8, burst=True) as w:
        w.thread.join(60)
    assert one(conn, "SELECT count(*) FROM tasks WHERE status = 'done'") == 45
    assert one(conn, "SELECT fair FROM flow_rules WHERE type = 'f_fair_limited'") is True
    assert one(conn, "SELECT count(*) FROM flow_rules WHERE type = 'f_plain'") == 0


# ------------------------------------------------------------------ visible: view, jobq top, metrics


def test_held_back_keys_show_in_top_and_the_exporter(client: Client, db_url: str, reset: None) -> None:
    from jobqueue.cli.top import render_text
    from jobqueue.observe.exporter import ViewsCollector
    from jobqueue.observe.snapshot import fetch

    add(client, "f_limited", 4, {}, owner="acme")
    add(client, "f_rate", 5, {}, owner="zeta")
    claim(db_url, "f_limited", 10, declare=True)
    claim(db_url, "f_rate", 10, declare=True)
    with psycopg.connect(db_url, autocommit=True) as c:
        snap = fetch(c, SCHEMA)
    assert {(r["type"], r["key"], r["held_by"], r["held_back"]) for r in snap.flow} == {
        ("f_limited", "acme", "limit", 2), ("f_rate", "", "rate", 2)}
    text = render_text(snap, width=160)
    assert "flow control" in text
    row = next(line for line in text.splitlines() if "acme" in line)
    # type, key, running, limit, queued, held back
    assert re.search(r"f_limited\s+acme\s+2\s+2\s+2\s+2 \(limit\)", row), row
    assert "3/3 per 1.0m" in text
    collector = ViewsCollector(db_url, SCHEMA)
    try:
        samples = {(f.name, tuple(sorted(s.labels.items())), s.value) for f in collector.collect() for s in f.samples}
    finally:
        collector.close()
    assert ("jobq_cluster_flow_running", (("key", "acme"), ("type", "f_limited")), 2) in samples
    assert ("jobq_cluster_flow_held_back", (("by", "limit"), ("key", "acme"), ("type", "f_limited")), 2) in samples
    assert any(name == "jobq_cluster_flow_wait_seconds" and 0 < value <= 60 for name, _, value in samples)


def test_top_has_no_flow_panel_without_declarations(client: Client, db_url: str, reset: None) -> None:
    from jobqueue.cli.top import render_text
    from jobqueue.observe.snapshot import fetch

    add(client, "f_plain", 2, {})
    with psycopg.connect(db_url, autocommit=True) as c:
        snap = fetch(c, SCHEMA)
    assert snap.flow == []
    assert "flow control" not in render_text(snap, width=160)
