"""The ASGI app: the pages (Jinja2, plain forms, one small script for live updates) and ``/api``.

``create_app()`` is what ``jobq ui`` serves with uvicorn. One :class:`~jobq_console.store.Store`
(psycopg, one connection per server thread) and one :class:`~jobq_console.live.Hub` (the one LISTEN
connection) per app. Route handlers are plain functions run in the server's thread pool, except the
event streams, which wait on the hub in the event loop.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobq_workers.splitter import PARSERS
from jobqueue import (
    LIVE,
    TERMINAL,
    DatabaseUnavailable,
    DocumentError,
    InvalidPayload,
    InvalidTransition,
    JobqError,
    PayloadTooLarge,
    PermissionDenied,
    QueueState,
    Settings,
    TaskNotFound,
    UnknownTaskType,
    __version__,
    get_settings,
)

from . import live
from .security import CSRF_COOKIE, Guard, csrf_ok, csrf_token
from .settings import ConsoleSettings
from .store import Store, Upload

STATUSES = [str(s) for s in (*LIVE, *TERMINAL)]

# The most ids one live stream follows (a page lists 50 tasks; a document of many ranges shows 200).
LIVE_IDS = 300

# Errors the library raises, as HTTP statuses (most specific first: DuplicateTask is an InvalidTransition).
STATUS_OF: list[tuple[type[Exception], int]] = [
    (TaskNotFound, 404), (UnknownTaskType, 422), (PayloadTooLarge, 413), (InvalidPayload, 400), (DocumentError, 400),
    (InvalidTransition, 409), (PermissionDenied, 403), (DatabaseUnavailable, 503),
]


def http_status(exc: Exception) -> int:
    return next((code for kind, code in STATUS_OF if isinstance(exc, kind)), 500)


# Parameter types (module level: the route signatures are resolved against this module's names).
Csrf = Annotated[str, Form()]
Statuses = Annotated[list[str] | None, Query()]


# ---------------------------------------------------------------- template helpers


def _ago(value: datetime | None) -> str:
    if value is None:
        return ""
    seconds = (datetime.now(value.tzinfo) - value).total_seconds()
    return f"{_duration(seconds)} ago" if seconds >= 0 else f"in {_duration(-seconds)}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return str(timedelta(seconds=round(seconds)))


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("jobq_console", "templates"), autoescape=True)
    env.filters.update(ago=_ago, duration=_duration, pct=lambda p: f"{max(float(p or 0), 0) * 100:.0f}%",
                       # JSON as the user wrote it (Jinja's tojson writes < as \u003c); autoescape makes it safe
                       pretty=lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str))
    return env


# ---------------------------------------------------------------- API bodies


class EnqueueIn(BaseModel):
    """One task for ``POST /api/tasks``: the keyword arguments of :meth:`jobqueue.Client.enqueue`."""

    model_config = ConfigDict(extra="forbid")
    type: str
    payload: Any = None
    priority: int | None = None
    run_at: datetime | None = None
    delay: float | None = None
    max_retries: int | None = None
    dedupe_key: str | None = None
    owner: str | None = None
    labels: list[str] | None = None
    depends_on: list[int] | None = None


class PriorityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    priority: int = Field(ge=-1_000_000, le=1_000_000)


class SelectorIn(BaseModel):
    """The tasks a bulk action acts on: every filter given must match, and at least one is required
    (an empty selector is a 400, never every task). A producer's selector matches only its role's tasks."""

    model_config = ConfigDict(extra="forbid")
    type: str | None = None
    owner: str | None = None
    batch_id: int | None = None
    label: str | None = None
    doc_id: int | None = None
    status: list[str] | str | None = None


class BulkPriorityIn(SelectorIn):
    priority: int = Field(ge=-1_000_000, le=1_000_000)


class CapIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_running: int = Field(ge=0, le=1_000_000, description="Most tasks of the type running at once, cluster-wide.")


def _ids(text: str | None) -> list[int]:
    """``1,2,3`` from a live stream's query string; anything else is a bad request."""
    if not text:
        return []
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidPayload("ids must be integers separated by commas") from None
    if len(ids) > LIVE_IDS:
        raise InvalidPayload(f"at most {LIVE_IDS} ids per stream")
    return ids


def _safe_next(target: str | None, fallback: str) -> str:
    """A redirect back into this console only (never //host or a scheme)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return fallback


def _tally(result: dict[int, str]) -> str:
    """``3 task(s) affected (2 cancelled, 1 running)``: the confirmation line of a bulk action."""
    counts: dict[str, int] = {}
    for status in result.values():
        counts[status] = counts.get(status, 0) + 1
    detail = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return f"{len(result)} task(s) affected" + (f" ({detail})" if detail else "")


def _queue_json(q: QueueState) -> dict[str, Any]:
    return {**q.model_dump(mode="json"), "served": q.served}


def _upload_report(result: Any) -> dict[str, Any]:
    files = []
    for f in result.files:
        row = dataclasses.asdict(f)
        row["name"] = Path(row.pop("path")).name
        files.append(row)
    return {"batch_id": result.batch_id, "files": files}


# ---------------------------------------------------------------- the app


def create_app(url: str | None = None, *, settings: Settings | None = None,
               console: ConsoleSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    console = console or ConsoleSettings()
    store = Store(url, settings)
    templates = Jinja2Templates(env=_environment())
    hub_box: list[live.Hub] = []

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(store.access)
        hub = live.Hub(store.url, settings.schema_name)
        hub.start()
        hub_box.append(hub)
        try:
            yield
        finally:
            await hub.stop()
            await run_in_threadpool(store.close)

    app = FastAPI(title="jobq", version=__version__, lifespan=lifespan, openapi_url="/api/openapi.json",
                  docs_url=None, redoc_url=None,
                  description="The HTTP API of jobq's web console: enqueue, upload, read, cancel, retry, follow; "
                              "cancel, retry or reprioritise a selection of tasks; pause, resume or cap a queue "
                              "(the schema owner's role only).")
    app.state.store = store
    app.state.hubs = hub_box
    app.mount("/static", StaticFiles(packages=[("jobq_console", "static")]), name="static")
    app.add_middleware(Guard, token=console.token)

    # -- errors: JSON under /api, a page elsewhere

    def error_response(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api"):
            return JSONResponse({"error": message, "status": status}, status_code=status)
        return page(request, "error.html", status_code=status, status=status, message=message)

    @app.exception_handler(JobqError)
    async def _jobq_error(request: Request, exc: JobqError) -> Response:
        return error_response(request, http_status(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form"))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid"))
        return error_response(request, 400, f"bad request: {message}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(request, exc.status_code, str(exc.detail))

    # -- helpers

    def page(request: Request, name: str, *, status_code: int = 200, **context: Any) -> Response:
        token = csrf_token(request)
        rights = store.rights
        response = templates.TemplateResponse(request, name, {
            "csrf": token, "read_only": rights.read_only, "control": rights.control and not rights.read_only,
            "all_chunks": rights.all_chunks,
            "msg": request.query_params.get("msg", ""),
            "statuses": STATUSES, "version": __version__, **context}, status_code=status_code)
        if request.cookies.get(CSRF_COOKIE) != token:
            response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict")
        return response

    def may_write(request: Request, sent: str | None = None, *, api: bool = False) -> None:
        if store.rights.read_only:
            raise HTTPException(403, "this console is read-only: its database role cannot change tasks")
        if not csrf_ok(request, sent, api=api):
            raise HTTPException(403, "missing or wrong CSRF token; reload the page")

    def back(target: str, message: str) -> RedirectResponse:
        sep = "&" if "?" in target else "?"
        return RedirectResponse(f"{target}{sep}{urlencode({'msg': message})}", status_code=303)

    def events(read: Callable[[], Any], *, until_finished: bool) -> StreamingResponse:
        async def rows() -> Any:
            return await run_in_threadpool(read)

        return StreamingResponse(live.stream(hub_box[0], rows, console.poll_seconds, until_finished=until_finished),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    # ================================================================ pages

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request) -> Response:
        rows = store.overview()
        return page(request, "overview.html", rows=rows, at=rows[0]["at"] if rows else None,
                    flow=store.flow_control())

    @app.post("/queues/{type}/{action}", include_in_schema=False)
    def queue_action(request: Request, type: str, action: str, csrf: Csrf = "",
                     max_running: Annotated[int | None, Form()] = None) -> Response:
        may_write(request, csrf)
        q = store.control_queue(action, type, max_running)
        cap = f", cap {q.max_running}" if q.max_running is not None else ", no cap"
        return back("/", f"{type}: {'paused' if q.paused else 'active'}{cap}")

    @app.get("/tasks", response_class=HTMLResponse, include_in_schema=False)
    def tasks_page(request: Request, status: Statuses = None, type: str | None = None, owner: str | None = None,
                   label: str | None = None, doc: int | None = None, error: str | None = None,
                   before: int | None = None) -> Response:
        found = store.tasks(status=[s for s in status or [] if s], type=type or None, owner=owner or None,
                            label=label or None, doc_id=doc, error=error or None, before_id=before,
                            limit=console.page_size)
        query = [(k, v) for k, v in request.query_params.multi_items() if k not in ("before", "msg")]
        more = f"?{urlencode([*query, ('before', found[-1].id)])}" if len(found) == console.page_size else None
        return page(request, "tasks.html", tasks=found, more=more, chosen=set(status or []),
                    f={"type": type or "", "owner": owner or "", "label": label or "", "doc": doc or "",
                       "error": error or ""})

    @app.post("/tasks/bulk", include_in_schema=False)
    def tasks_bulk(request: Request, action: Annotated[str, Form()], csrf: Csrf = "",
                   status: Annotated[list[str] | None, Form()] = None, type: Annotated[str, Form()] = "",
                   owner: Annotated[str, Form()] = "", label: Annotated[str, Form()] = "",
                   doc: Annotated[int | None, Form()] = None,
                   priority: Annotated[int | None, Form()] = None) -> Response:
        """The selection the task list's filters describe (the error-text filter cannot select: the form
        is not offered with it); with no filter at all the client refuses (400)."""
        may_write(request, csrf)
        statuses = [s for s in status or [] if s]
        selector: dict[str, Any] = {"status": statuses or None, "type": type or None, "owner": owner or None,
                                    "label": label or None, "doc_id": doc}
        if action == "cancel":
            message = f"cancel: {_tally(store.cancel_where(**selector))}"
        elif action == "retry":
            message = f"retry: {_tally(store.retry_where(**selector))}"
        elif action == "priority":
            if priority is None:
                raise InvalidPayload("set priority needs a priority")
            message = f"priority {priority}: {len(store.prioritize_where(priority, **selector))} task(s) affected"
        else:
            raise InvalidPayload(f"no bulk action {action!r}: cancel, retry or priority")
        shown: list[tuple[str, Any]] = [("status", s) for s in statuses]
        shown += [(k, v) for k, v in (("type", type), ("owner", owner), ("label", label), ("doc", doc)) if v]
        return back(f"/tasks?{urlencode(shown)}" if shown else "/tasks", message)

    @app.get("/tasks/{task_id}", response_class=HTMLResponse, include_in_schema=False)
    def task_page(request: Request, task_id: int) -> Response:
        return page(request, "task.html", **store.task_detail(task_id))

    @app.post("/tasks/{task_id}/cancel", include_in_schema=False)
    def task_cancel(request: Request, task_id: int, csrf: Csrf = "", next: Annotated[str, Form()] = "") -> Response:
        may_write(request, csrf)
        result = store.cancel(task_id)
        return back(_safe_next(next, f"/tasks/{task_id}"), f"task {task_id}: {result.get(task_id, 'unchanged')}")

    @app.post("/tasks/{task_id}/retry", include_in_schema=False)
    def task_retry(request: Request, task_id: int, csrf: Csrf = "", next: Annotated[str, Form()] = "") -> Response:
        may_write(request, csrf)
        result = store.retry(task_id)
        return back(_safe_next(next, f"/tasks/{task_id}"), f"task {task_id}: {result.get(task_id)}")

    @app.post("/tasks/{task_id}/priority", include_in_schema=False)
    def task_priority(request: Request, task_id: int, priority: Annotated[int, Form()], csrf: Csrf = "") -> Response:
        may_write(request, csrf)
        changed = store.set_priority(priority, task_id=task_id)
        return back(f"/tasks/{task_id}", f"priority {priority}: {len(changed)} task(s) not yet started changed")

    @app.get("/documents", response_class=HTMLResponse, include_in_schema=False)
    def documents_page(request: Request, status: str | None = None, owner: str | None = None,
                       before: int | None = None) -> Response:
        docs = store.documents(status=status or None, owner=owner or None, before_id=before, limit=console.page_size)
        query = [(k, v) for k, v in request.query_params.multi_items() if k not in ("before", "msg")]
        more = f"?{urlencode([*query, ('before', docs[-1]['doc_id'])])}" if len(docs) == console.page_size else None
        return page(request, "documents.html", docs=docs, more=more, parsers=PARSERS,
                    f={"status": status or "", "owner": owner or ""})

    @app.post("/documents", include_in_schema=False)
    def documents_upload(request: Request, files: Annotated[list[UploadFile], File()], csrf: Csrf = "",
                         parser: Annotated[str, Form()] = "general", page_size: Annotated[str, Form()] = "",
                         then: Annotated[str, Form()] = "", priority: Annotated[int, Form()] = 0,
                         owner: Annotated[str, Form()] = "") -> Response:
        """The upload form: the API's options (an empty pages-per-task field is the parser's default)."""
        may_write(request, csrf)
        try:
            pages_per_task = int(page_size) if page_size.strip() else None
        except ValueError:
            raise InvalidPayload("pages per task must be a whole number") from None
        result = store.upload([Upload(f.filename or "", f.file) for f in files], parser=parser,
                              page_size=pages_per_task, then=then or None, priority=priority, owner=owner or None)
        report = _upload_report(result)
        lines = [f"{f['name']}: document {f['doc_id']}, {len(f['tasks'])} task(s)" if f["error"] is None
                 else f"{f['name']}: {f['error']}" for f in report["files"]]
        return back("/documents", "; ".join(lines))

    @app.get("/documents/{doc_id}", response_class=HTMLResponse, include_in_schema=False)
    def document_page(request: Request, doc_id: int, after: str | None = None) -> Response:
        key = None
        if after:
            try:
                a, b, c = (int(x) for x in after.split("."))
            except ValueError:
                raise InvalidPayload("after must be page.position.id") from None
            key = (a, b, c)
        detail = store.document_detail(doc_id, key, console.page_size)
        chunks = detail["chunks"]
        more = None
        if len(chunks) == console.page_size:
            last = chunks[-1]
            more = f"?after={last['from_page']}.{last['position']}.{last['id']}"
        return page(request, "document.html", more=more, **detail)

    def _doc_action(request: Request, doc_id: int, csrf: str, action: Callable[[], Any], what: str) -> Response:
        may_write(request, csrf)
        store.document(doc_id)
        result = action()
        return back(f"/documents/{doc_id}", f"document {doc_id}: {what} {len(result)} task(s)")

    @app.post("/documents/{doc_id}/cancel", include_in_schema=False)
    def document_cancel(request: Request, doc_id: int, csrf: Csrf = "") -> Response:
        return _doc_action(request, doc_id, csrf, lambda: store.cancel(doc_id=doc_id), "cancel reached")

    @app.post("/documents/{doc_id}/retry", include_in_schema=False)
    def document_retry(request: Request, doc_id: int, csrf: Csrf = "") -> Response:
        return _doc_action(request, doc_id, csrf, lambda: store.retry(doc_id=doc_id), "retried")

    @app.post("/documents/{doc_id}/priority", include_in_schema=False)
    def document_priority(request: Request, doc_id: int, priority: Annotated[int, Form()], csrf: Csrf = "") -> Response:
        return _doc_action(request, doc_id, csrf, lambda: store.set_priority(priority, doc_id=doc_id),
                           f"priority {priority} for")

    @app.get("/workers", response_class=HTMLResponse, include_in_schema=False)
    def workers_page(request: Request) -> Response:
        return page(request, "workers.html", workers=store.workers(), running=store.running())

    @app.get("/failures", response_class=HTMLResponse, include_in_schema=False)
    def failures_page(request: Request) -> Response:
        return page(request, "failures.html", failures=store.failures())

    @app.get("/events", include_in_schema=False)
    def page_events(tasks: str | None = None, docs: str | None = None) -> StreamingResponse:
        task_ids, doc_ids = _ids(tasks), _ids(docs)
        return events(lambda: store.live(task_ids, doc_ids), until_finished=False)

    # ================================================================ API

    @app.post("/api/tasks", status_code=201, tags=["tasks"])
    def api_enqueue(request: Request, body: EnqueueIn) -> dict[str, Any]:
        """Enqueue one task; 422 for a type this server does not know, 400 for a bad payload."""
        may_write(request, api=True)
        options = body.model_dump(exclude={"type", "payload"}, exclude_none=True)
        return {"id": store.enqueue(body.type, body.payload, **options)}

    @app.get("/api/tasks", tags=["tasks"])
    def api_tasks(status: Statuses = None, type: str | None = None, owner: str | None = None,
                  label: str | None = None, doc_id: int | None = None, error: str | None = None,
                  before: int | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        """Newest first; every filter optional; pass ``next`` back as ``before`` for the next page."""
        found = store.tasks(status=status, type=type, owner=owner, label=label, doc_id=doc_id, error=error,
                            before_id=before, limit=limit)
        return {"tasks": [t.model_dump(mode="json") for t in found],
                "next": found[-1].id if len(found) == limit else None}

    @app.post("/api/tasks/cancel", tags=["bulk"])
    def api_cancel_where(request: Request, body: SelectorIn) -> dict[str, Any]:
        """Cancel every live task the selector matches: ``{tasks: {id: status}, count}``; 400 without a selector."""
        may_write(request, api=True)
        result = store.cancel_where(**body.model_dump())
        return {"tasks": {str(k): v for k, v in result.items()}, "count": len(result)}

    @app.post("/api/tasks/retry", tags=["bulk"])
    def api_retry_where(request: Request, body: SelectorIn) -> dict[str, Any]:
        """Retry every failed or cancelled task the selector matches; 400 without a selector."""
        may_write(request, api=True)
        result = store.retry_where(**body.model_dump())
        return {"tasks": {str(k): v for k, v in result.items()}, "count": len(result)}

    @app.post("/api/tasks/prioritize", tags=["bulk"])
    def api_prioritize_where(request: Request, body: BulkPriorityIn) -> dict[str, Any]:
        """Give the queued and waiting tasks the selector matches a new priority; 400 without a selector."""
        may_write(request, api=True)
        changed = store.prioritize_where(body.priority, **body.model_dump(exclude={"priority"}))
        return {"changed": changed, "count": len(changed)}

    @app.get("/api/queues", tags=["queues"])
    def api_queues() -> dict[str, Any]:
        """Every type known (queues table, live tasks, live workers): paused, cap, counts, live workers."""
        return {"queues": [_queue_json(q) for q in store.queues()]}

    def queue_change(request: Request, type: str, action: str, max_running: int | None = None) -> dict[str, Any]:
        may_write(request, api=True)
        return _queue_json(store.control_queue(action, type, max_running))

    @app.post("/api/queues/{type}/pause", tags=["queues"])
    def api_pause(request: Request, type: str) -> dict[str, Any]:
        """Stop claiming the type from the next claim on (running tasks carry on); 403 unless the schema owner."""
        return queue_change(request, type, "pause")

    @app.post("/api/queues/{type}/resume", tags=["queues"])
    def api_resume(request: Request, type: str) -> dict[str, Any]:
        """Claim the type again; 403 unless the schema owner."""
        return queue_change(request, type, "resume")

    @app.post("/api/queues/{type}/cap", tags=["queues"])
    def api_cap(request: Request, type: str, body: CapIn) -> dict[str, Any]:
        """At most ``max_running`` tasks of the type running at once; 403 unless the schema owner."""
        return queue_change(request, type, "cap", body.max_running)

    @app.delete("/api/queues/{type}/cap", tags=["queues"])
    def api_uncap(request: Request, type: str) -> dict[str, Any]:
        """Remove the type's cap; 403 unless the schema owner."""
        return queue_change(request, type, "uncap")

    @app.get("/api/tasks/{task_id}", tags=["tasks"])
    def api_task(task_id: int) -> dict[str, Any]:
        return store.task(task_id).model_dump(mode="json")

    @app.post("/api/tasks/{task_id}/cancel", tags=["tasks"])
    def api_cancel(request: Request, task_id: int) -> dict[str, Any]:
        """``{id: status}``: ``cancelled``, or ``running`` while its worker stops it."""
        may_write(request, api=True)
        return {"tasks": {str(k): v for k, v in store.cancel(task_id).items()}}

    @app.post("/api/tasks/{task_id}/retry", tags=["tasks"])
    def api_retry(request: Request, task_id: int) -> dict[str, Any]:
        """409 when the task is not failed or cancelled."""
        may_write(request, api=True)
        return {"tasks": {str(k): v for k, v in store.retry(task_id).items()}}

    @app.post("/api/tasks/{task_id}/priority", tags=["tasks"])
    def api_priority(request: Request, task_id: int, body: PriorityIn) -> dict[str, Any]:
        may_write(request, api=True)
        return {"changed": store.set_priority(body.priority, task_id=task_id)}

    @app.get("/api/tasks/{task_id}/events", tags=["tasks"])
    def api_task_events(task_id: int) -> StreamingResponse:
        """Server-sent events: a ``task`` event per change (status, progress, message), ``end`` when finished."""
        store.task(task_id)
        return events(lambda: store.live([task_id], []), until_finished=True)

    @app.post("/api/documents", status_code=201, tags=["documents"])
    def api_upload(request: Request, files: Annotated[list[UploadFile], File()],
                   parser: Annotated[str, Form()] = "general", page_size: Annotated[int | None, Form()] = None,
                   then: Annotated[str | None, Form()] = None, priority: Annotated[int, Form()] = 0,
                   owner: Annotated[str | None, Form()] = None) -> dict[str, Any]:
        """Upload documents (multipart, field ``files``) as one batch; per-file errors in the answer, 400
        when no file could be enqueued, 413 for a file over JOBQ_MAX_DOCUMENT_BYTES."""
        may_write(request, api=True)
        result = store.upload([Upload(f.filename or "", f.file) for f in files], parser=parser,
                              page_size=page_size, then=then or None, priority=priority, owner=owner or None)
        report = _upload_report(result)
        if not result.doc_ids:
            raise DocumentError("; ".join(f"{f['name']}: {f['error'] or f['note']}" for f in report["files"]))
        return report

    @app.get("/api/documents", tags=["documents"])
    def api_documents(status: str | None = None, owner: str | None = None, before: int | None = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        docs = store.documents(status=status, owner=owner, before_id=before, limit=limit)
        return {"documents": jsonable(docs), "next": docs[-1]["doc_id"] if len(docs) == limit else None}

    @app.get("/api/documents/{doc_id}", tags=["documents"])
    def api_document(doc_id: int) -> dict[str, Any]:
        detail = store.document_detail(doc_id, None, 0)
        return {**jsonable(detail["doc"]), "ranges": jsonable(detail["tasks"])}

    @app.post("/api/documents/{doc_id}/cancel", tags=["documents"])
    def api_document_cancel(request: Request, doc_id: int) -> dict[str, Any]:
        may_write(request, api=True)
        store.document(doc_id)
        return {"tasks": {str(k): v for k, v in store.cancel(doc_id=doc_id).items()}}

    @app.post("/api/documents/{doc_id}/retry", tags=["documents"])
    def api_document_retry(request: Request, doc_id: int) -> dict[str, Any]:
        may_write(request, api=True)
        store.document(doc_id)
        return {"tasks": {str(k): v for k, v in store.retry(doc_id=doc_id).items()}}

    @app.get("/api/documents/{doc_id}/events", tags=["documents"])
    def api_document_events(doc_id: int) -> StreamingResponse:
        """Server-sent events: a ``document`` event per change of its state or progress, ``end`` when finished."""
        store.document(doc_id)
        return events(lambda: store.live([], [doc_id]), until_finished=True)

    return app


def jsonable(value: Any) -> Any:
    """Rows as JSON: datetimes as ISO 8601."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


__all__ = ["create_app", "http_status"]
