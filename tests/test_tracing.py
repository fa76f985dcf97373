"""OpenTelemetry tracing (jobq[otel]): the enqueueing span is the parent of every attempt's span,
progress messages are span events, retries and cancels show on the spans, a document is one trace,
and without opentelemetry nothing changes (no trace context in the row)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import REPO, SCHEMA, BackgroundWorker, create_database, drop_database, wait_for

from jobqueue import AsyncClient, Client, Context, Snooze, TaskSpec, task

EXPORTER = InMemorySpanExporter()
tracer = trace.get_tracer("jobq-tests")


@task("tr_steps", max_retries=0)
def tr_steps(ctx: Context, payload: Any) -> Any:  # a sync handler: runs in a thread
    for i in range(3):
        ctx.progress((i + 1) / 3, f"step {i + 1}")
    with tracer.start_as_current_span("inside the handler"):
        return {"ok": True}


@task("tr_flaky", max_retries=3, backoff_base=0.05, backoff_max=0.1)
async def tr_flaky(ctx: Context, payload: Any) -> Any:
    if ctx.attempt < 2:
        raise ConnectionError("model endpoint timed out")
    return None


@task("tr_snooze", max_retries=0)
async def tr_snooze(ctx: Context, payload: Any) -> Any:
    if ctx.attempt < 2:
        raise Snooze(0.05)
    return None


@task("tr_hold", max_retries=0)
async def tr_hold(ctx: Context, payload: Any) -> Any:
    ctx.progress(0.1, "holding")
    await asyncio.sleep(30)


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    """One SDK provider for the process (OpenTelemetry allows setting it once), spans kept in memory."""
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    current.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def spans(conn: psycopg.Connection[Any]) -> Iterator[InMemorySpanExporter]:
    conn.execute("TRUNCATE tasks, documents, batches, chunks, workers RESTART IDENTITY CASCADE")
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def attempts(exporter: InMemorySpanExporter, task_id: int) -> list[ReadableSpan]:
    found = [s for s in exporter.get_finished_spans() if s.name.startswith("jobq.run ")
             and s.attributes and s.attributes.get("jobq.task.id") == task_id]
    return sorted(found, key=lambda s: int(s.attributes["jobq.task.attempt"]))  # type: ignore[index]


def finished(conn: psycopg.Connection[Any], ids: list[int]) -> bool:
    row = conn.execute("SELECT bool_and(status IN ('done', 'failed', 'cancelled')) FROM tasks WHERE id = ANY(%s)",
                       (ids,)).fetchone()
    return bool(row and row[0])


def test_attempt_span_is_a_child_of_the_enqueueing_span(client: Client, conn: psycopg.Connection[Any],
                                                         spans: InMemorySpanExporter) -> None:
    with tracer.start_as_current_span("request") as parent:
        tid = client.enqueue("tr_steps", {})
    stored = conn.execute("SELECT trace_context FROM tasks WHERE id = %s", (tid,)).fetchone()[0]
    assert stored["traceparent"].split("-")[1] == format(parent.get_span_context().trace_id, "032x")
    with BackgroundWorker(["tr_steps"], poll_seconds=0.1):
        wait_for(lambda: len(attempts(spans, tid)) == 1, timeout=15)
    (span,) = attempts(spans, tid)
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.attributes is not None and span.attributes["jobq.task.type"] == "tr_steps"
    assert span.attributes["jobq.task.outcome"] == "done" and span.attributes["jobq.task.attempt"] == 1
    assert [e.name for e in span.events] == ["step 1", "step 2", "step 3"]
    assert span.events[-1].attributes == {"jobq.progress": 1.0}
    # The handler's own span (a sync handler, in a thread) is a child of the attempt's span.
    (inner,) = [s for s in spans.get_finished_spans() if s.name == "inside the handler"]
    assert inner.parent is not None and inner.parent.span_id == span.context.span_id


def test_no_current_span_writes_no_trace_context(client: Client, conn: psycopg.Connection[Any],
                                                 spans: InMemorySpanExporter) -> None:
    one = client.enqueue("tr_steps", {})
    many = client.enqueue_many("tr_steps", [{}, {}])
    assert conn.execute("SELECT count(*) FROM tasks WHERE trace_context IS NOT NULL").fetchone()[0] == 0
    with BackgroundWorker(["tr_steps"], poll_seconds=0.1):
        wait_for(lambda: finished(conn, [one, *many]), timeout=15)
    assert all(attempts(spans, t)[0].parent is None for t in (one, *many))  # root spans then


def test_batches_carry_the_context_both_clients_every_path(client: Client, conn: psycopg.Connection[Any],
                                                           db_url: str, spans: InMemorySpanExporter) -> None:
    async def async_side() -> list[int]:
        aclient = AsyncClient(db_url)
        try:
            with tracer.start_as_current_span("async producer"):
                return [await aclient.enqueue("tr_steps", {}), *await aclient.enqueue_many("tr_steps", [{}, {}])]
        finally:
            await aclient.close()

    with tracer.start_as_current_span("sync producer") as parent:
        ids = client.enqueue_many("tr_steps", [{}, {}])  # COPY
        ids += client.enqueue_many("tr_steps", [TaskSpec({}, dedupe_key="k1")])  # the enqueue_many statement
        ids.append(client.enqueue("tr_steps", {}, depends_on=[ids[0]]))  # with a dependency
    copied = {r[0] for r in conn.execute("SELECT trace_context->>'traceparent' FROM tasks WHERE id = ANY(%s)", (ids,))}
    assert len(ids) == 4 and len(copied) == 1 and format(parent.get_span_context().trace_id, "032x") in copied.pop()
    async_ids = asyncio.run(async_side())
    traces = conn.execute("SELECT count(DISTINCT trace_context->>'traceparent') FROM tasks WHERE id = ANY(%s)",
                          (async_ids,)).fetchone()[0]
    assert traces == 1


def test_a_retried_task_shows_one_span_per_attempt(client: Client, conn: psycopg.Connection[Any],
                                                    spans: InMemorySpanExporter) -> None:
    with tracer.start_as_current_span("request") as parent:
        flaky = client.enqueue("tr_flaky", {})
        snoozing = client.enqueue("tr_snooze", {})
    with BackgroundWorker(["tr_flaky", "tr_snooze"], poll_seconds=0.05):
        wait_for(lambda: len(attempts(spans, flaky)) == 2 and len(attempts(spans, snoozing)) == 2, timeout=15)
    first, second = attempts(spans, flaky)
    assert {first.context.trace_id, second.context.trace_id} == {parent.get_span_context().trace_id}
    assert first.attributes is not None and first.attributes["jobq.task.outcome"] == "retry"
    assert first.status.status_code == trace.StatusCode.ERROR
    assert "ConnectionError: model endpoint timed out" in (first.status.description or "")
    assert [e.name for e in first.events] == ["jobq.retry"]
    assert second.attributes is not None and second.attributes["jobq.task.outcome"] == "done"
    assert second.status.status_code == trace.StatusCode.OK
    snoozed, done = attempts(spans, snoozing)
    assert snoozed.attributes is not None and snoozed.attributes["jobq.task.outcome"] == "snoozed"
    assert [(e.name, dict(e.attributes or {})) for e in snoozed.events] == [("jobq.snoozed",
                                                                              {"jobq.snooze_seconds": 0.05})]
    assert done.attributes is not None and done.attributes["jobq.task.outcome"] == "done"


def test_a_cancel_shows_on_the_attempt_span(client: Client, conn: psycopg.Connection[Any],
                                            spans: InMemorySpanExporter) -> None:
    with tracer.start_as_current_span("request"):
        tid = client.enqueue("tr_hold", {})
    with BackgroundWorker(["tr_hold"], poll_seconds=0.05):
        wait_for(lambda: client.get(tid).status == "running", timeout=15)
        client.cancel(tid)
        wait_for(lambda: len(attempts(spans, tid)) == 1, timeout=15)
    (span,) = attempts(spans, tid)
    assert span.attributes is not None and span.attributes["jobq.task.outcome"] == "cancelled"
    assert [(e.name, dict(e.attributes or {})) for e in span.events][-1] == ("jobq.cancelled",
                                                                              {"jobq.cancel_reason": "user"})
    assert span.events[0].name == "holding"


def test_a_document_is_one_trace(conn: psycopg.Connection[Any], spans: InMemorySpanExporter) -> None:
    from jobq_workers.documents import enqueue_files

    res = enqueue_files([str(REPO / "examples" / "samples" / "handbook.pdf")], then="raptor",
                        pages="1-9", page_size=3).files[0]
    assert res.doc_id is not None and res.then_task is not None and len(res.tasks) == 3
    (root,) = [s for s in spans.get_finished_spans() if s.name == "jobq.enqueue document"]
    with BackgroundWorker(["dataflow", "raptor"], concurrency=3, poll_seconds=0.1):
        wait_for(lambda: finished(conn, [*res.tasks, res.then_task]), timeout=90)
        wait_for(lambda: all(attempts(spans, t) for t in [*res.tasks, res.then_task]), timeout=10)
    runs = [attempts(spans, t)[0] for t in [*res.tasks, res.then_task]]
    assert {s.context.trace_id for s in runs} == {root.context.trace_id}
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in runs)
    assert {s.attributes["jobq.task.doc_id"] for s in runs if s.attributes} == {res.doc_id}
    assert [s.name for s in runs] == ["jobq.run dataflow"] * 3 + ["jobq.run raptor"]
    assert all(s.attributes and s.attributes["jobq.task.outcome"] == "done" for s in runs)
    assert any(s.events for s in runs[:3])  # the dataflow tasks' progress messages


BLOCKED = textwrap.dedent("""
    import sys

    class NoOpenTelemetry:  # as if the extra were not installed
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoOpenTelemetry())
    sys.path.insert(0, sys.argv[2])
    import asyncio
    from jobqueue import Client, tracing, task
    from support import BackgroundWorker, wait_for

    assert not tracing.enabled() and tracing.current_context() is None
    with tracing.traced("no-op", {"a": 1}):
        pass

    @task("tr_plain")
    def tr_plain(ctx, payload):
        ctx.progress(0.5, "halfway")
        return {"ok": True}

    client = Client(sys.argv[1])
    ids = [client.enqueue("tr_plain", {}), *client.enqueue_many("tr_plain", [{}, {}])]
    with BackgroundWorker(["tr_plain"], poll_seconds=0.1):
        wait_for(lambda: all(client.get(i).status == "done" for i in ids), timeout=20)
    assert "opentelemetry" not in sys.modules
    print(",".join(map(str, ids)))
""")


def test_without_opentelemetry_it_all_works_and_writes_nothing(db_url: str, conn: psycopg.Connection[Any],
                                                               spans: InMemorySpanExporter) -> None:
    out = subprocess.run([sys.executable, "-c", BLOCKED, db_url, str(REPO / "tests")], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    ids = [int(i) for i in out.stdout.strip().split(",")]
    rows = conn.execute("SELECT status, trace_context FROM tasks WHERE id = ANY(%s)", (ids,)).fetchall()
    assert rows == [("done", None)] * 3


def test_migration_grants_the_column_to_existing_producers(server_url: str) -> None:
    """A role granted column INSERT on tasks before the migration (as `jobq roles` grants producers)
    may insert trace_context after it, without running `jobq roles` again; down and up again."""
    import uuid

    from alembic import command
    from alembic.script import ScriptDirectory

    from jobqueue.admin.migrate import alembic_config, migrate

    url = create_database(server_url)
    role = f"jobq_tr_{uuid.uuid4().hex[:6]}"
    before = ScriptDirectory.from_config(alembic_config(url)).get_revision("0011").down_revision
    assert isinstance(before, str)

    def may_insert() -> bool | None:
        with psycopg.connect(url) as c:
            if not c.execute("SELECT count(*) FROM information_schema.columns WHERE table_schema = %s "
                             "AND table_name = 'tasks' AND column_name = 'trace_context'", (SCHEMA,)).fetchone()[0]:
                return None
            return bool(c.execute("SELECT has_column_privilege(%s, %s, 'trace_context', 'INSERT')",
                                  (role, f'"{SCHEMA}".tasks')).fetchone()[0])

    try:
        migrate(url, revision=before)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f'CREATE ROLE "{role}"')
            c.execute(f'GRANT INSERT (type, payload) ON "{SCHEMA}".tasks TO "{role}"')
        assert may_insert() is None
        migrate(url)
        assert may_insert() is True
        command.downgrade(alembic_config(url), before)
        assert may_insert() is None
        migrate(url)
        assert may_insert() is True
    finally:
        drop_database(server_url, url)
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_jobq_never_imports_opentelemetry_itself() -> None:
    """Installed but unused, the extra costs nothing: not even its import (the app imports it to trace)."""
    code = ("import sys, jobqueue, jobqueue.client.sync, jobqueue.client.aio, jobqueue.runtime.worker, "
            "jobq_workers.documents; from jobqueue import tracing; "
            "assert tracing.current_context() is None and not tracing.enabled(); "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
