"""Tracing with OpenTelemetry (pip install 'jobq[otel]'): one trace from the enqueueing code to every
attempt of the task, across the queue.

The enqueue runs under the caller's span, so the task row stores that span's context; the worker runs
each attempt under a span that is its child, with the handler's progress messages as events and the
outcome (done, retry, failed, snoozed, cancelled) as an attribute. Here the spans go to memory and are
printed as a tree; in production set an OTLP exporter (or run under `opentelemetry-instrument`).

Run: python examples/tracing.py
"""

from __future__ import annotations

import asyncio
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobqueue import Client, Context, task
from jobqueue.runtime.worker import Worker

spans = InMemorySpanExporter()


@task("embed_chunks", max_retries=3, backoff_base=0.1, backoff_max=0.2)
async def embed_chunks(ctx: Context, payload: dict[str, Any]) -> dict[str, int]:
    ctx.progress(0.5, f"embedding {payload['chunks']} chunks")
    if ctx.attempt == 1:
        raise ConnectionError("embedding endpoint timed out")  # retried: a second attempt span
    ctx.progress(1.0, "stored")
    return {"stored": payload["chunks"]}


async def run() -> list[ReadableSpan]:
    client = Client()
    with trace.get_tracer("example").start_as_current_span("POST /documents"):
        task_id = client.enqueue("embed_chunks", {"chunks": 12})
    worker = Worker(["embed_chunks"], poll_seconds=0.1)
    runner = asyncio.create_task(worker.run())
    while client.get(task_id).status != "done":
        await asyncio.sleep(0.05)
    worker.stop()
    await runner
    client.close()
    return sorted(spans.get_finished_spans(), key=lambda s: s.start_time or 0)


def main() -> dict[str, Any]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # a process may set its provider only once
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    finished = asyncio.run(run())
    root = next(s for s in finished if s.name == "POST /documents")
    attempts = [s for s in finished if s.name == "jobq.run embed_chunks"]
    print(f"trace {root.context.trace_id:032x}")
    print(f"  {root.name}")
    for s in attempts:
        attrs = dict(s.attributes or {})
        print(f"    {s.name} attempt={attrs['jobq.task.attempt']} outcome={attrs['jobq.task.outcome']} "
              f"status={s.status.status_code.name}")
        for e in s.events:
            print(f"      event: {e.name}")
    return {
        "one_trace": all(s.context.trace_id == root.context.trace_id for s in attempts),
        "outcomes": [dict(s.attributes or {})["jobq.task.outcome"] for s in attempts],
        "events": [e.name for e in attempts[-1].events],
    }


if __name__ == "__main__":
    main()
