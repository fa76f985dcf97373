"""OpenTelemetry tracing, the optional extra ``jobq[otel]``: the only module that imports opentelemetry.

When the application traces, an enqueue made while a span is current stores that span's context
(W3C traceparent/tracestate, as JSON) in the task's ``trace_context`` column, and the worker runs
each attempt under a span whose parent it is, so the trace crosses the queue. ``ctx.progress(...,
message)`` becomes an event of the attempt's span; how the attempt ended (done, retry, failed,
snoozed, cancelled) its ``jobq.task.outcome`` attribute, status and events.

Without the extra, or while the application has not imported opentelemetry itself (then no span can
be current and no tracer provider is set), every function here is a cheap no-op that imports
nothing: the clients write no trace context and the worker starts no span. jobq never imports
opentelemetry on its own, so a process that does not trace pays neither its import time (about
30 ms) nor a span.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from jobqueue.states import CancelReason, Outcome

if TYPE_CHECKING:
    from jobqueue.runtime.context import Context
    from jobqueue.runtime.executor import Ack

TRACER = "jobq"
# What the application imports when it traces (the API, or the SDK that imports it).
_API = "opentelemetry.trace"


def enabled() -> bool:
    """The application traces: it imported opentelemetry and set a tracer provider (the API's default
    is a proxy that records nothing: spans are not worth starting then)."""
    if _API not in sys.modules:
        return False
    from opentelemetry import trace

    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def current_context() -> str | None:
    """The current span's context as JSON text for the trace_context column; None when no span is
    current (or opentelemetry was never imported), so nothing is written to the row."""
    if _API not in sys.modules:
        return None
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(carrier, separators=(",", ":")) if carrier else None


@contextlib.contextmanager
def traced(name: str, attributes: Mapping[str, str | int | float | bool | None] | None = None) -> Iterator[None]:
    """A span around producer code (None attributes are left out): tasks enqueued inside it carry it
    as their parent, so e.g. a document's range tasks and its raptor task share one trace."""
    if not enabled():
        yield
        return
    from opentelemetry import trace

    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    with trace.get_tracer(TRACER).start_as_current_span(name, attributes=attrs):
        yield


class AttemptSpan:
    """The span of one attempt; the handler's code (and what it enqueues) runs under it. A context
    manager: the span is current inside, and ends on exit with how the attempt ended."""

    def __init__(self, ctx: Context, carrier: str | None) -> None:
        from opentelemetry import propagate, trace

        task = ctx.task
        parent = None
        if carrier:
            try:
                parent = propagate.extract(json.loads(carrier))
            except (ValueError, TypeError, AttributeError):  # a row written by hand: a root span then
                parent = None
        attrs: dict[str, Any] = {"jobq.task.id": task.id, "jobq.task.type": task.type,
                                 "jobq.task.attempt": task.attempt}
        if task.doc_id is not None:
            attrs["jobq.task.doc_id"] = task.doc_id
        self.span = trace.get_tracer(TRACER).start_span(f"jobq.run {task.type}", context=parent,
                                                        kind=trace.SpanKind.CONSUMER, attributes=attrs)
        self.ack: Ack | None = None  # set by the executor: how the attempt ended
        self.reason: CancelReason | None = None

    def __enter__(self) -> AttemptSpan:
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Detach the span and end it: with the outcome of `ack`, or the error the runtime raised."""
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        otel_context.detach(self._token)
        if exc is not None:
            self.span.set_attribute("jobq.task.outcome", "error")
            self.span.record_exception(exc)
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
            self.span.end()
        else:
            self.end(self.ack, self.reason)

    def progress(self, fraction: float | None, message: str) -> None:
        attrs = {"jobq.progress": fraction} if fraction is not None else {}
        self.span.add_event(message, attrs)

    def end(self, ack: Ack | None, reason: CancelReason | None) -> None:
        """Record how the attempt ended (no Ack: the lease was lost, or the handler's transaction
        completed the task) and end the span."""
        from opentelemetry import trace

        span = self.span
        outcome = ack.outcome if ack is not None else None
        span.set_attribute("jobq.task.outcome", str(outcome or ("lost" if reason == CancelReason.LOST else "done")))
        if ack is not None and outcome in (Outcome.RETRY, Outcome.FAILED):
            summary = (ack.error or "").strip().splitlines()[-1:] or [str(outcome)]
            span.add_event(f"jobq.{outcome}", {"jobq.error": ack.error or ""})
            span.set_status(trace.Status(trace.StatusCode.ERROR, summary[0][:500]))
        elif ack is not None and outcome is Outcome.SNOOZED:
            span.add_event("jobq.snoozed", {"jobq.snooze_seconds": ack.seconds})
        elif outcome in (Outcome.CANCELLED, Outcome.RELEASED):
            span.add_event(f"jobq.{outcome}", {"jobq.cancel_reason": str(reason or CancelReason.USER)})
        elif reason != CancelReason.LOST:
            span.set_status(trace.Status(trace.StatusCode.OK))
        span.end()


def attempt_span(ctx: Context) -> AttemptSpan | None:
    """The attempt's span (a child of the enqueueing span the row carries), or None when tracing is off."""
    return AttemptSpan(ctx, ctx.task.trace_context) if enabled() else None
