"""The web console's HTTP side on a real database: every page, the /api endpoints and their status codes,
CSRF, the read-only role, authentication, the one shared LISTEN connection, escaping (a fuzz test), and
the query plans of the console's own statements on a large history.

The browser tests (a real Chromium) are tests/test_ui_browser.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    FULL,
    SAMPLES,
    SCHEMA,
    BackgroundWorker,
    dashboard_login,
    drop_login,
    jobq_cli,
    one,
    serve,
    wait_for,
)

from jobqueue import Client, Context, Fail, task

pytest.importorskip("fastapi", reason="the web console needs the [ui] extra")

from fastapi.testclient import TestClient

from jobq_console import ConsoleSettings, create_app
from jobq_console.live import APPLICATION_NAME
from jobq_console.queries import ConsoleSQL

API = {"X-Jobq-Client": "tests"}
PAGES = ["/", "/tasks", "/documents", "/workers", "/failures"]


@task("ui_ok")
async def ui_ok(ctx: Context, payload: Any) -> Any:
    ctx.progress(0.5, "halfway")
    return {"ok": True}


@task("ui_fail", max_retries=0)
async def ui_fail(ctx: Context, payload: Any) -> None:
    raise Fail(f"ui_fail: {payload.get('why', 'bad input') if isinstance(payload, dict) else 'bad input'}")


@task("ui_slow")
async def ui_slow(ctx: Context, payload: Any) -> None:
    for i in range(2000):
        ctx.progress(i / 2000, f"step {i}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def web(db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(db_url)) as c:
        yield c


def page_csrf(web: TestClient, path: str) -> str:
    """Load a page the way a browser does (setting the CSRF cookie) and return its form token."""
    r = web.get(path)
    assert r.status_code == 200, r.text
    found = re.search(r'name="csrf" value="([^"]+)"', r.text)
    assert found, "the page has no action form"
    return found.group(1)


def finished(client: Client, task_id: int) -> str | None:
    s = client.get(task_id).status
    return s if s in ("done", "failed", "cancelled") else None


# ---------------------------------------------------------------- pages


def test_every_page_renders_with_data(web: TestClient, client: Client, clean: None) -> None:
    ok = client.enqueue("ui_ok", {"n": 1}, labels=["blue"], owner="alice")
    bad = client.enqueue("ui_fail", {"why": "no pages"})
    with BackgroundWorker(["ui_ok", "ui_fail"], poll_seconds=0.2):
        wait_for(lambda: finished(client, ok) and finished(client, bad))
    r = web.post("/api/documents", files={"files": ("guide.md", (SAMPLES / "guide.md").read_bytes())},
                 data={"then": "raptor"}, headers=API)
    assert r.status_code == 201, r.text
    doc = r.json()["files"][0]["doc_id"]
    for path in [*PAGES, f"/tasks/{ok}", f"/tasks/{bad}", f"/documents/{doc}", "/tasks?status=failed",
                 f"/tasks?doc={doc}", "/tasks?error=no+pages", "/tasks?owner=alice&label=blue"]:
        r = web.get(path)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-security-policy"].startswith("default-src 'self'")
    overview = web.get("/").text
    assert "ui_ok" in overview and "ui_fail" in overview
    failed = web.get("/tasks?error=NO+PAGES").text  # the error filter is case-insensitive
    assert f'href="/tasks/{bad}"' in failed and f'href="/tasks/{ok}"' not in failed
    assert f'href="/tasks/{ok}"' in web.get("/tasks?owner=alice&label=blue").text
    assert "ui_fail: no pages" in web.get(f"/tasks/{bad}").text
    assert "ui_fail: no pages" in web.get("/failures").text
    docpage = web.get(f"/documents/{doc}").text
    assert "guide.md" in docpage and 'class="strip"' in docpage and "raptor" in docpage
    assert web.get("/tasks/999999").status_code == 404
    assert web.get("/documents/999999").status_code == 404
    huge = 10**20  # over bigint: the database's refusal is a 400, never a 500
    for path in (f"/documents/{huge}", f"/api/documents/{huge}", f"/api/tasks/{huge}", f"/tasks?doc={huge}"):
        assert web.get(path).status_code in (400, 404), path


def test_task_list_pages_by_keyset(web: TestClient, client: Client, clean: None) -> None:
    ids = client.enqueue_many("ui_ok", [{"i": i} for i in range(120)])
    seen: list[int] = []
    nxt: int | None = None
    while True:
        r = web.get("/api/tasks", params={"type": "ui_ok", "limit": 50, **({"before": nxt} if nxt else {})})
        assert r.status_code == 200
        body = r.json()
        seen += [t["id"] for t in body["tasks"]]
        nxt = body["next"]
        if nxt is None:
            break
    assert seen == sorted(ids, reverse=True)
    html = web.get("/tasks?type=ui_ok").text
    assert f"before={ids[-50]}" in html  # the page links to the next keyset page


# ---------------------------------------------------------------- API


def test_api_enqueue_get_cancel_retry_and_errors(web: TestClient, client: Client, clean: None) -> None:
    r = web.post("/api/tasks", json={"type": "ui_ok", "payload": {"x": 1}, "priority": 5, "labels": ["l"]},
                 headers=API)
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    got = web.get(f"/api/tasks/{tid}").json()
    assert got["payload"] == {"x": 1} and got["priority"] == 5 and got["status"] == "queued"

    def err(resp: httpx.Response, code: int) -> str:
        assert resp.status_code == code, resp.text
        body = resp.json()
        assert body["status"] == code and body["error"]
        return str(body["error"])

    assert "unknown task type" in err(web.post("/api/tasks", json={"type": "nope"}, headers=API), 422)
    err(web.post("/api/tasks", content=b"{not json", headers={**API, "content-type": "application/json"}), 400)
    err(web.post("/api/tasks", json={"payload": {}}, headers=API), 400)  # no type
    err(web.post("/api/tasks", json={"type": "ui_ok", "surprise": 1}, headers=API), 400)
    err(web.post("/api/tasks", json={"type": "ui_ok", "owner": "a\x00b"}, headers=API), 400)
    too_big = {"type": "ui_ok", "payload": "x" * 1_000_001}  # over JOBQ_MAX_PAYLOAD_BYTES' default
    assert "over the limit of 1000000" in err(web.post("/api/tasks", json=too_big, headers=API), 413)
    err(web.get("/api/tasks/987654321"), 404)
    err(web.get("/api/documents/987654321"), 404)
    err(web.post("/api/tasks/987654321/cancel", headers=API), 404)
    assert "only failed or cancelled" in err(web.post(f"/api/tasks/{tid}/retry", headers=API), 409)

    assert web.post(f"/api/tasks/{tid}/priority", json={"priority": 9}, headers=API).json() == {"changed": [tid]}
    assert client.get(tid).priority == 9
    assert web.post(f"/api/tasks/{tid}/cancel", headers=API).json() == {"tasks": {str(tid): "cancelled"}}
    assert web.post(f"/api/tasks/{tid}/retry", headers=API).json() == {"tasks": {str(tid): "queued"}}
    listed = web.get("/api/tasks", params={"status": ["queued"], "label": "l"}).json()["tasks"]
    assert [t["id"] for t in listed] == [tid]


def test_api_upload_too_large_and_unsupported(web: TestClient, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobqueue.settings import get_settings

    monkeypatch.setenv("JOBQ_MAX_DOCUMENT_BYTES", "1000")
    get_settings.cache_clear()
    try:
        with TestClient(create_app(db_url)) as small:
            r = small.post("/api/documents", files={"files": ("big.md", b"# big\n" + b"x" * 2000)}, headers=API)
            assert r.status_code == 413 and "over the limit of 1000" in r.json()["error"]
    finally:
        monkeypatch.delenv("JOBQ_MAX_DOCUMENT_BYTES")
        get_settings.cache_clear()
    r = web.post("/api/documents", files={"files": ("x.exe", b"MZ\x00\x01")}, headers=API)
    assert r.status_code == 400 and "x.exe" in r.json()["error"]
    r = web.post("/api/documents", data={"parser": "general"}, headers=API)  # no file
    assert r.status_code == 400


def test_openapi_describes_the_api(web: TestClient) -> None:
    spec = web.get("/api/openapi.json").json()
    paths = spec["paths"]
    for path in ("/api/tasks", "/api/tasks/{task_id}", "/api/tasks/{task_id}/cancel", "/api/tasks/{task_id}/retry",
                 "/api/tasks/{task_id}/events", "/api/documents", "/api/documents/{doc_id}",
                 "/api/documents/{doc_id}/events", "/api/tasks/cancel", "/api/tasks/retry", "/api/tasks/prioritize",
                 "/api/queues", "/api/queues/{type}/pause", "/api/queues/{type}/resume", "/api/queues/{type}/cap"):
        assert path in paths, path
    assert {"post", "delete"} <= set(paths["/api/queues/{type}/cap"])
    assert "max_running" in json.dumps(spec["components"]["schemas"]["CapIn"])
    assert "post" in paths["/api/documents"] and "multipart/form-data" in json.dumps(paths["/api/documents"])
    assert not [p for p in paths if not p.startswith("/api/")]  # the pages are not part of the API


def test_document_upload_and_event_stream_to_done(web: TestClient, client: Client, clean: None) -> None:
    r = web.post("/api/documents", files={"files": ("handbook.pdf", (SAMPLES / "handbook.pdf").read_bytes())},
                 data={"parser": "general", "page_size": "8"}, headers=API)
    assert r.status_code == 201, r.text
    doc = r.json()["files"][0]
    assert doc["name"] == "handbook.pdf" and len(doc["tasks"]) == 5  # 37 pages by 8
    events: list[dict[str, Any]] = []
    with BackgroundWorker(["dataflow"], poll_seconds=0.2), \
            web.stream("GET", f"/api/documents/{doc['doc_id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append({"event": event, **json.loads(line[6:])})
    assert events[-1]["event"] == "end" and events[-1]["status"] == ["done"]
    progress = [e["progress"] for e in events if e["event"] == "document"]
    assert progress[-1] == 1 and len(progress) >= 2 and progress == sorted(progress)
    detail = web.get(f"/api/documents/{doc['doc_id']}").json()
    assert detail["status"] == "done" and detail["chunks"] > 0 and len(detail["ranges"]) == 5
    html = web.get(f"/documents/{doc['doc_id']}").text
    strip = html.split('id="ranges"', 1)[1].split("</div>", 1)[0]
    assert strip.count('class="cell st-done"') == 5
    assert re.search(r"<td>1(\u2013\d+)?</td>", html)  # chunks carry their page numbers (an en dash)


def test_upload_form_takes_the_parser_options(web: TestClient, client: Client, clean: None) -> None:
    """The page's upload form passes what the API and `jobq enqueue FILE` take: parser, pages per task,
    owner, priority and then raptor."""
    token = page_csrf(web, "/documents")
    owner = f"form-{uuid.uuid4().hex[:6]}"
    pdf = ("handbook.pdf", (SAMPLES / "handbook.pdf").read_bytes())
    r = web.post("/documents", files={"files": pdf}, data={"csrf": token, "page_size": "abc"})
    assert r.status_code == 400 and "pages per task" in r.text
    r = web.post("/documents", files={"files": pdf}, follow_redirects=False,
                 data={"csrf": token, "parser": "general", "page_size": "10", "owner": owner, "priority": "2",
                       "then": "raptor"})
    assert r.status_code == 303, r.text
    tasks = client.list(owner=owner)
    assert sorted(t.type for t in tasks) == ["dataflow"] * 4 + ["raptor"]  # 37 pages by 10, then raptor
    assert {t.priority for t in tasks} == {2}


# ---------------------------------------------------------------- CSRF, read-only, authentication


def test_page_actions_need_the_csrf_token(web: TestClient, client: Client, clean: None) -> None:
    tid = client.enqueue("ui_ok", {})
    token = page_csrf(web, f"/tasks/{tid}")
    assert web.post(f"/tasks/{tid}/cancel", data={}).status_code == 403
    assert web.post(f"/tasks/{tid}/cancel", data={"csrf": "forged"}).status_code == 403
    other = TestClient(web.app)  # another browser: no cookie, even with a token seen elsewhere
    assert other.post(f"/tasks/{tid}/cancel", data={"csrf": token}).status_code == 403
    # an API call from a browser without the client header or the token is refused too
    assert web.post(f"/api/tasks/{tid}/cancel").status_code == 403
    assert client.get(tid).status == "queued"
    r = web.post(f"/tasks/{tid}/cancel", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith(f"/tasks/{tid}?msg=")
    assert client.get(tid).status == "cancelled"
    r = web.post(f"/tasks/{tid}/retry", data={"csrf": token, "next": "//evil.example/x"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith(f"/tasks/{tid}?")  # no open redirect
    assert client.get(tid).status == "queued"
    r = web.post(f"/tasks/{tid}/priority", data={"csrf": token, "priority": "7"}, follow_redirects=False)
    assert r.status_code == 303 and client.get(tid).priority == 7


@pytest.fixture(scope="module")
def dashboard_url(db_url: str) -> Iterator[str]:
    url = dashboard_login(db_url)
    yield url
    drop_login(db_url, url)


def test_read_only_role_sees_no_action_and_is_refused(dashboard_url: str, client: Client, clean: None) -> None:
    queued = client.enqueue("ui_ok", {})
    failed = client.enqueue("ui_fail", {})
    with BackgroundWorker(["ui_fail"], poll_seconds=0.2):
        wait_for(lambda: finished(client, failed))
    doc = client.enqueue("ui_ok", {})
    with TestClient(create_app(dashboard_url)) as ro:
        for path in [*PAGES, f"/tasks/{queued}", f"/tasks/{failed}", f"/tasks/{doc}"]:
            r = ro.get(path)
            assert r.status_code == 200, (path, r.text)
            assert 'method="post"' not in r.text, path
            assert 'id="read-only"' in r.text
        ro.cookies.set("jobq_csrf", "t")
        assert ro.post(f"/tasks/{queued}/cancel", data={"csrf": "t"}).status_code == 403
        assert ro.post(f"/tasks/{failed}/retry", data={"csrf": "t"}).status_code == 403
        r = ro.post("/api/tasks", json={"type": "ui_ok"}, headers=API)
        assert r.status_code == 403 and "read-only" in r.json()["error"]
        assert ro.post(f"/api/tasks/{queued}/cancel", headers=API).status_code == 403
        assert ro.get(f"/api/tasks/{queued}").json()["status"] == "queued"
    assert client.get(queued).status == "queued" and client.get(failed).status == "failed"


def test_token_is_required_when_set(db_url: str) -> None:
    with TestClient(create_app(db_url, console=ConsoleSettings(token="s3cret"))) as web:
        r = web.get("/")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert web.get("/api/tasks", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert web.get("/api/tasks", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        basic = base64.b64encode(b"anyone:s3cret").decode()
        assert web.get("/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        # a bearer token stands for the CSRF check of API calls (a browser never adds one by itself)
        r = web.post("/api/tasks", json={"type": "ui_ok"}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 201


def test_ui_refuses_a_network_address_without_a_token(db_url: str) -> None:
    from jobq_console import BindingRefused, check_binding

    for host in ("127.0.0.1", "localhost", "::1"):
        check_binding(host, ConsoleSettings(token=None))
    with pytest.raises(BindingRefused):
        check_binding("0.0.0.0", ConsoleSettings(token=None))
    check_binding("0.0.0.0", ConsoleSettings(token="t"))
    res = jobq_cli("ui", "--host", "0.0.0.0", env={"JOBQ_UI_TOKEN": ""})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "JOBQ_UI_TOKEN" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------- one LISTEN connection per server


def test_many_streams_share_one_listen_connection(db_url: str, client: Client, conn: psycopg.Connection[Any],
                                                  clean: None) -> None:
    ids = [client.enqueue("ui_ok", {}) for _ in range(3)]
    app = create_app(db_url)
    seen: dict[int, list[str]] = {i: [] for i in ids}

    def follow(base: str, tid: int) -> None:
        with httpx.stream("GET", f"{base}/api/tasks/{tid}/events", timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen[tid].append(json.loads(line[6:])["status"] if "status" in line else "")
                if line == "event: end":
                    return

    count = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
             "AND datname = current_database()")
    before = one(conn, count, APPLICATION_NAME)  # other apps of this module have theirs
    with serve(app) as base:
        threads = [threading.Thread(target=follow, args=(base, tid), daemon=True) for tid in ids]
        for t in threads:
            t.start()
        wait_for(lambda: all(seen[i] for i in ids))
        assert one(conn, count, APPLICATION_NAME) == before + 1  # three streams, one LISTEN connection
        assert app.state.hubs[0].connects == 1
        with BackgroundWorker(["ui_ok"], poll_seconds=0.2):
            for t in threads:
                t.join(30)
        assert app.state.hubs[0].notifications > 0  # the streams were woken by NOTIFY
    assert all(seen[i][0] == "queued" and seen[i][-1] == "done" for i in ids), seen


# ---------------------------------------------------------------- escaping


NASTY = st.one_of(
    st.sampled_from(['<script>alert("x")</script>', "\"'><img src=x onerror=alert(1)>", "</pre><b>bold</b>",
                     "{{ 7*7 }}", "&lt;already&gt;", "\u202e\u0007\x1b[31m", "a\r\nb\tc", "javascript:alert(1)"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
)


TAG_START = re.compile(r"<[A-Za-z/!?]")


class _Tags(HTMLParser):
    """Every element of a page with its attribute names."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _marker_free(html: str, s: str) -> None:
    """The text appears only escaped: never as markup that could open a tag, and no element of the page
    is one the fuzzed text could have made (a script without our src, an img, a b, an on* attribute)."""
    if TAG_START.search(s):
        assert s not in html, s
    parser = _Tags()
    parser.feed(html)
    injected = [(t, a) for t, a in parser.tags
                if t in ("img", "b") or any(k.startswith("on") for k in a)
                or (t == "script" and a.get("src") != "/static/console.js")]
    assert injected == [], (s, injected)


@settings(max_examples=60 if FULL else 15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=NASTY)
def test_fuzz_task_text_is_escaped_everywhere(web: TestClient, client: Client, conn: psycopg.Connection[Any],
                                              s: str) -> None:
    """Script tags, quotes and control characters in a payload, owner, label, progress message, error
    and file name come out escaped on every page and as valid JSON from the API (or, where PostgreSQL
    cannot store them, as a 400, never a 500)."""
    r = web.post("/api/tasks", json={"type": "ui_ok", "payload": {"s": s}, "owner": s[:50], "labels": [s[:50]]},
                 headers=API)
    assert r.status_code in (201, 400), r.text
    if r.status_code == 400:
        assert "\x00" in s
        return
    tid = r.json()["id"]
    conn.execute("UPDATE tasks SET progress_msg = %s, last_error = %s, status = 'failed', finished_at = now() "
                 "WHERE id = %s", (s, s, tid))
    up = web.post("/api/documents", files={"files": (f"{s[:30]}.md", f"# {s}\n\ntext {uuid.uuid4()}".encode())},
                  headers=API)
    assert up.status_code in (201, 400), up.text
    docs = [f"/documents/{up.json()['files'][0]['doc_id']}"] if up.status_code == 201 else []
    gets: list[tuple[str, dict[str, str]]] = [(p, {}) for p in [*PAGES, f"/tasks/{tid}", *docs]]
    gets += [("/tasks", {"owner": s[:50]}), ("/tasks", {"error": s[:50]}), ("/tasks", {"label": s[:50]})]
    for path, params in gets:
        page = web.get(path, params=params)
        assert page.status_code in (200, 400), (path, page.text)
        _marker_free(page.text, s)
        assert "<script>alert" not in page.text
    got = web.get(f"/api/tasks/{tid}").json()
    assert got["payload"] == {"s": s} and got["last_error"] == s
    assert web.get("/api/tasks", params={"owner": s[:50]}).status_code in (200, 400)


# ---------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def big(db_url: str) -> int:
    """A few hundred thousand tasks (test_views' history), a few hundred documents with chunks and one
    flow-controlled type."""
    from test_views import load_history

    rows = 300_000
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("TRUNCATE tasks, workers, queues, documents, batches, chunks RESTART IDENTITY CASCADE")
        load_history(c, rows)
        c.execute("""INSERT INTO documents (name, size, format, kind, parser, pages, content_digest, uri)
                     SELECT 'doc' || i || '.pdf', 10, 'pdf', 'pdf', 'general', 40, md5(i::text), '/x/' || i
                     FROM generate_series(1, 500) i""")
        c.execute("""UPDATE tasks SET doc_id = 1 + id % 500, from_page = (id % 5) * 8, to_page = (id % 5) * 8 + 8
                     WHERE id % 97 = 0""")
        c.execute("""INSERT INTO chunks (doc_id, level, position, from_page, to_page, text, token_count, digest)
                     SELECT 1 + i % 500, (i % 10 = 0)::int, i / 500, i % 40, i % 40, 'chunk ' || i, 5, md5(i::text)
                     FROM generate_series(1, 50000) i""")
        c.execute("INSERT INTO flow_rules (type, key, max_per_key) VALUES ('type0', 'owner', 2) "
                  "ON CONFLICT (type) DO NOTHING")  # the overview's flow section reads flow_control
        c.execute("VACUUM ANALYZE tasks")
        for table in ("documents", "chunks", "flow_rules"):
            c.execute(f"ANALYZE {table}")
    return rows


def _plans() -> list[tuple[str, str, list[Any]]]:
    q = ConsoleSQL.load(SCHEMA)
    from jobqueue.db.queries import ClientSQL

    c = ClientSQL.load(SCHEMA)
    return [
        ("task list, no filter", c.list, [None, None, None, None, None, None, 50, None]),
        ("task list by status and type", c.list, [["failed"], ["type1"], None, None, None, None, 50, None]),
        ("task list, next page", c.list, [None, None, None, None, None, 150_000, 50, None]),
        ("task list by document", c.list, [None, None, None, 7, None, None, 50, None]),
        ("task list by owner", c.list, [None, None, "alice", None, None, None, 50, None]),
        ("task", c.get, [1234]),
        ("parents", q.parents, [[1, 2, 3]]),
        ("children", q.children, [1234, 7]),
        ("documents", q.documents, [None, None, None, 50]),
        ("documents, next page", q.documents, [None, None, 300, 50]),
        ("document", q.document, [7]),
        ("document tasks", q.document_tasks, [7]),
        ("document chunks", q.document_chunks, [7, None, None, None, 50, 400]),
        ("document chunks, next page", q.document_chunks, [7, 10, 0, 100, 50, 400]),
        ("document summaries", q.document_summaries, [7, 400]),
        ("own document chunks", q.own_document_chunks, [7, None, None, None, 50, 400]),
        ("own document summaries", q.own_document_summaries, [7, 400]),
        ("running tasks", q.running_tasks, []),
        ("overview", q.overview, []),
        ("overview's flow control", q.flow_control, [50]),
        ("workers", q.workers, [3600]),
        ("failures", q.failures, [200]),
        ("live tasks", q.live_tasks, [[1, 2, 3]]),
        ("live documents", q.live_documents, [[1, 2, 3]]),
    ]


@pytest.mark.parametrize("name", [p[0] for p in _plans()])
def test_console_queries_use_indexes(conn: psycopg.Connection[Any], big: int, name: str) -> None:
    """Each page's statements read through an index, never a scan of tasks, documents or chunks. The task
    filters without an index of their own (status of finished tasks, type, labels, error text) walk the
    primary key newest first until a page is full: rows read grow with how rare the match is (failed
    tasks of one type, 0.8% of this history, read about 2%), never with the size of the table."""
    from test_views import explain, plan_nodes

    sql, params = next((s, p) for n, s, p in _plans() if n == name)
    plan = explain(conn, sql, params, analyze=True)
    scans = [n for n in plan_nodes(plan) if n.get("Relation Name") in ("tasks", "documents", "chunks")]
    assert scans, f"{name} reads none of the tables?"
    seq = [n["Relation Name"] for n in scans if n["Node Type"] == "Seq Scan"]
    assert not seq, f"{name} scans {seq}"
    read = sum(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) + n.get("Rows Removed by Filter", 0)
               for n in scans if n.get("Relation Name") == "tasks")
    assert read < big * 0.05, f"{name} read {read} task rows"


def test_jobq_ui_serves_the_console(db_url: str) -> None:
    """`jobq ui` as an operator runs it: it says where it listens and answers there."""
    import socket
    import subprocess
    import sys

    from support import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "jobqueue", "ui", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert f"http://127.0.0.1:{port}/" in proc.stdout.readline()

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/tasks", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, timeout=30, interval=0.2)
        assert "Queues" in httpx.get(f"http://127.0.0.1:{port}/").text
    finally:
        proc.terminate()
        proc.wait(15)


def test_document_actions_and_stale_workers(web: TestClient, client: Client, conn: psycopg.Connection[Any],
                                            clean: None) -> None:
    r = web.post("/api/documents", files={"files": ("notes.md", f"# notes {uuid.uuid4()}\n\nsome text".encode())},
                 data={"then": "raptor"}, headers=API)
    assert r.status_code == 201, r.text
    doc = r.json()["files"][0]["doc_id"]
    r = web.post(f"/api/documents/{doc}/retry", headers=API)
    assert r.status_code == 409 and "no failed or cancelled task" in r.json()["error"]
    token = page_csrf(web, f"/documents/{doc}")
    r = web.post(f"/documents/{doc}/priority", data={"csrf": token, "priority": "3"}, follow_redirects=False)
    assert r.status_code == 303
    assert {t.priority for t in client.list(doc_id=doc)} == {3}  # the range and its waiting raptor task
    r = web.post(f"/documents/{doc}/cancel", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303
    assert {t.status for t in client.list(doc_id=doc)} == {"cancelled"}
    assert web.get(f"/api/documents/{doc}").json()["status"] == "cancelled"
    assert set(web.post(f"/api/documents/{doc}/retry", headers=API).json()["tasks"].values()) <= {"queued", "waiting"}
    assert web.post("/api/documents/987654321/cancel", headers=API).status_code == 404

    conn.execute("INSERT INTO workers (id, host, pid, types, concurrency, last_seen) VALUES "
                 "('w-old', 'h1', 1, '{dataflow}', 4, now() - interval '10 minutes'), "
                 "('w-new', 'h2', 2, '{dataflow}', 4, now())")
    html = web.get("/workers").text
    rows = re.findall(r'<tr class="(stale|)">\s*<td>(w-\w+)</td>', html)
    assert sorted(rows) == [("", "w-new"), ("stale", "w-old")]


# ---------------------------------------------------------------- queue control and bulk actions


@pytest.fixture(scope="module")
def producer_url(db_url: str) -> Iterator[str]:
    """A login in the producer role (<schema>_producer): it may enqueue and change its own tasks, not
    pause or cap a queue (docs/roles.md)."""
    url = dashboard_login(db_url, "producer")
    yield url
    drop_login(db_url, url)


def queue_of(web: TestClient, task_type: str) -> dict[str, Any]:
    return next(q for q in web.get("/api/queues").json()["queues"] if q["type"] == task_type)


def test_api_pause_resume_cap_uncap_a_queue(web: TestClient, client: Client, clean: None) -> None:
    client.enqueue("ui_ok", {})
    q = queue_of(web, "ui_ok")
    assert (q["paused"], q["max_running"], q["queued"], q["workers"], q["served"]) == (False, None, 1, 0, False)
    r = web.post("/api/queues/ui_ok/pause", headers=API)
    assert r.status_code == 200, r.text
    assert r.json()["paused"] is True and queue_of(web, "ui_ok")["paused"] is True
    assert next(s for s in client.queues() if s.type == "ui_ok").paused  # the client sees the same state
    assert web.post("/api/queues/ui_ok/cap", json={"max_running": 2}, headers=API).json()["max_running"] == 2
    assert next(s for s in client.queues() if s.type == "ui_ok").max_running == 2
    r = web.delete("/api/queues/ui_ok/cap", headers=API)
    assert r.status_code == 200 and r.json()["max_running"] is None
    assert web.post("/api/queues/ui_ok/resume", headers=API).json()["paused"] is False
    state = next(s for s in client.queues() if s.type == "ui_ok")
    assert (state.paused, state.max_running) == (False, None)
    # a queue with no task yet can be paused ahead of the first enqueue
    assert web.post("/api/queues/ui_slow/pause", headers=API).json()["paused"] is True
    assert queue_of(web, "ui_slow")["queued"] == 0

    def err(resp: httpx.Response, code: int) -> str:
        assert resp.status_code == code, resp.text
        return str(resp.json()["error"])

    assert "max_running" in err(web.post("/api/queues/ui_ok/cap", json={"max_running": -1}, headers=API), 400)
    err(web.post("/api/queues/ui_ok/cap", json={}, headers=API), 400)
    assert "task type name" in err(web.post("/api/queues/bad%20name!/pause", headers=API), 400)
    err(web.post("/api/queues/ui_ok/pause"), 403)  # a browser without the client header or CSRF token


def test_api_bulk_cancel_retry_prioritize_by_selector(web: TestClient, client: Client, clean: None) -> None:
    blue = client.enqueue_many("ui_ok", [{"i": i} for i in range(3)], labels=["blue"])
    other = client.enqueue("ui_ok", {"i": 99}, labels=["green"])

    def err(resp: httpx.Response, code: int) -> str:
        assert resp.status_code == code, resp.text
        return str(resp.json()["error"])

    for path in ("/api/tasks/cancel", "/api/tasks/retry"):
        assert "selector" in err(web.post(path, json={}, headers=API), 400)
    assert "selector" in err(web.post("/api/tasks/prioritize", json={"priority": 3}, headers=API), 400)
    err(web.post("/api/tasks/cancel", json={"label": "blue", "colour": "x"}, headers=API), 400)
    assert "cannot cancel 'done'" in err(web.post("/api/tasks/cancel", json={"status": ["done"]}, headers=API), 400)

    r = web.post("/api/tasks/prioritize", json={"label": "blue", "priority": 7}, headers=API)
    assert r.status_code == 200, r.text
    assert r.json() == {"changed": sorted(blue), "count": 3}
    assert {t.priority for t in client.list(label="blue")} == {7} and client.get(other).priority == 0
    r = web.post("/api/tasks/cancel", json={"type": "ui_ok", "label": "blue"}, headers=API)
    assert r.json() == {"tasks": {str(i): "cancelled" for i in blue}, "count": 3}
    assert client.get(other).status == "queued"
    r = web.post("/api/tasks/retry", json={"label": "blue", "status": "cancelled"}, headers=API)
    assert r.json() == {"tasks": {str(i): "queued" for i in blue}, "count": 3}
    assert web.post("/api/tasks/cancel", json={"label": "nothing-has-it"}, headers=API).json() == {"tasks": {},
                                                                                                  "count": 0}
    assert web.post("/api/tasks/cancel", json={"label": "blue"}).status_code == 403  # no CSRF, no client header


def test_overview_queue_controls_and_flow_section(web: TestClient, client: Client, conn: psycopg.Connection[Any],
                                                  clean: None) -> None:
    conn.execute("TRUNCATE flow_rules, flow_grants")
    client.enqueue("ui_ok", {})
    html = web.get("/").text
    assert 'action="/queues/ui_ok/pause"' in html and 'action="/queues/ui_ok/cap"' in html
    assert "no worker" in html and 'id="flow"' not in html  # nothing is flow-controlled
    token = page_csrf(web, "/")
    assert web.post("/queues/ui_ok/pause", data={}).status_code == 403  # CSRF
    r = web.post("/queues/ui_ok/pause", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/?msg=")
    assert next(s for s in client.queues() if s.type == "ui_ok").paused
    html = web.get("/").text
    assert 'class="badge paused"' in html and 'action="/queues/ui_ok/resume"' in html
    r = web.post("/queues/ui_ok/cap", data={"csrf": token, "max_running": "3"}, follow_redirects=False)
    assert r.status_code == 303 and "cap 3" in web.get(r.headers["location"]).text
    web.post("/queues/ui_ok/uncap", data={"csrf": token})
    web.post("/queues/ui_ok/resume", data={"csrf": token})
    state = next(s for s in client.queues() if s.type == "ui_ok")
    assert (state.paused, state.max_running) == (False, None)
    assert web.post("/queues/ui_ok/explode", data={"csrf": token}).status_code == 400

    conn.execute("INSERT INTO flow_rules (type, key, max_per_key) VALUES ('ui_ok', 'owner', 1)")
    for _ in range(2):
        client.enqueue("ui_ok", {}, owner="tenant-<b>")
    conn.execute("UPDATE tasks SET status = 'running', worker_id = 'w', started_at = now(), attempt = 1, "
                 "lease_expires_at = now() + interval '1 hour' WHERE id = (SELECT min(id) FROM tasks "
                 "WHERE owner = 'tenant-<b>')")
    try:
        html = web.get("/").text
        flow = html[html.index('id="flow"'):]
        assert "tenant-&lt;b&gt;" in flow and "<b>" not in flow.split("</table>")[0]
        row = re.search(r"<td>ui_ok</td><td>tenant-&lt;b&gt;</td><td>(\d+)</td><td>(\d+)</td>\s*<td>(\d+)</td>", flow)
        assert row and row.groups() == ("1", "1", "1"), flow[:600]  # 1 queued, 1 running, limit 1
        assert '<span class="bad">1</span>' in flow and "limit" in flow  # held back by the limit
    finally:
        conn.execute("TRUNCATE tasks, flow_rules, flow_grants RESTART IDENTITY CASCADE")


def test_bulk_actions_on_the_tasks_page(web: TestClient, client: Client, clean: None) -> None:
    red = client.enqueue_many("ui_ok", [{"i": i} for i in range(4)], labels=["red"])
    keep = client.enqueue("ui_ok", {}, labels=["plain"])
    assert 'id="bulk"' not in web.get("/tasks").text  # no filter: no bulk form
    assert 'id="bulk"' not in web.get("/tasks?label=red&error=x").text  # the error text cannot select
    html = web.get("/tasks?label=red&status=queued").text
    form = html[html.index('id="bulk"'):html.index("</form>", html.index('id="bulk"'))]
    assert 'name="label" value="red"' in form and 'name="status" value="queued"' in form
    token = page_csrf(web, "/tasks?label=red")
    assert web.post("/tasks/bulk", data={"action": "cancel", "label": "red"}).status_code == 403  # CSRF
    r = web.post("/tasks/bulk", data={"csrf": token, "action": "cancel"})
    assert r.status_code == 400 and "selector" in r.text  # nothing selected: refused, never every task
    r = web.post("/tasks/bulk", data={"csrf": token, "action": "priority", "priority": "5", "label": "red",
                                      "status": "queued"}, follow_redirects=False)
    assert r.status_code == 303
    assert {t.priority for t in client.list(label="red")} == {5} and client.get(keep).priority == 0
    r = web.post("/tasks/bulk", data={"csrf": token, "action": "cancel", "label": "red", "priority": ""},
                 follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/tasks?label=red&msg=")
    assert "cancel: 4 task(s) affected (4 cancelled)" in web.get(r.headers["location"]).text
    assert {client.get(i).status for i in red} == {"cancelled"} and client.get(keep).status == "queued"
    r = web.post("/tasks/bulk", data={"csrf": token, "action": "retry", "label": "red", "status": "cancelled"})
    assert r.status_code == 200 and "retry: 4 task(s) affected (4 queued)" in r.text
    assert web.post("/tasks/bulk", data={"csrf": token, "action": "burn", "label": "red"}).status_code == 400


def test_priority_goes_through_the_client_so_a_producer_may(producer_url: str, client: Client, clean: None) -> None:
    """A producer login holds no UPDATE on tasks: the console's priority action is the client's prioritize
    (ownership rules), not an UPDATE of its own; pausing a queue stays the schema owner's, refused with a
    message saying so."""
    with TestClient(create_app(producer_url)) as prod:
        r = prod.post("/api/tasks", json={"type": "ui_ok", "labels": ["mine"]}, headers=API)
        assert r.status_code == 201, r.text
        mine = r.json()["id"]
        assert prod.post(f"/api/tasks/{mine}/priority", json={"priority": 4}, headers=API).json() == {
            "changed": [mine]}
        assert client.get(mine).priority == 4
        other = client.enqueue("ui_ok", {}, labels=["mine"])  # by the owner, not the producer
        r = prod.post(f"/api/tasks/{other}/priority", json={"priority": 4}, headers=API)
        assert r.status_code == 403 and "another role" in r.json()["error"]
        r = prod.post("/api/tasks/prioritize", json={"label": "mine", "priority": 6}, headers=API)
        assert r.json() == {"changed": [mine], "count": 1}  # its selector matches only its own tasks
        r = prod.post("/api/queues/ui_ok/pause", headers=API)
        assert r.status_code == 403 and "only the schema owner" in r.json()["error"], r.text
        token = page_csrf(prod, f"/tasks/{mine}")
        r = prod.post("/queues/ui_ok/pause", data={"csrf": token})
        assert r.status_code == 403 and "only the schema owner" in r.text and "Traceback" not in r.text
    assert not next(s for s in client.queues() if s.type == "ui_ok").paused


def test_read_only_role_has_no_queue_or_bulk_action(dashboard_url: str, client: Client, clean: None) -> None:
    client.enqueue("ui_ok", {}, labels=["ro"])
    with TestClient(create_app(dashboard_url)) as ro:
        assert "queues" in ro.get("/api/queues").json()
        for path in ("/", "/tasks?label=ro"):
            html = ro.get(path).text
            assert 'method="post"' not in html and 'id="bulk"' not in html, path
        ro.cookies.set("jobq_csrf", "t")
        assert ro.post("/queues/ui_ok/pause", data={"csrf": "t"}).status_code == 403
        assert ro.post("/tasks/bulk", data={"csrf": "t", "action": "cancel", "label": "ro"}).status_code == 403
        for path, body in (("/api/tasks/cancel", {"label": "ro"}), ("/api/tasks/retry", {"label": "ro"}),
                           ("/api/tasks/prioritize", {"label": "ro", "priority": 1}), ("/api/queues/ui_ok/pause", None),
                           ("/api/queues/ui_ok/cap", {"max_running": 1})):
            r = ro.post(path, json=body, headers=API)
            assert r.status_code == 403 and "read-only" in r.json()["error"], path
        assert ro.delete("/api/queues/ui_ok/cap", headers=API).status_code == 403
    assert [t.status for t in client.list(label="ro")] == ["queued"]
    assert not next(s for s in client.queues() if s.type == "ui_ok").paused


def _document_with_chunks(conn: psycopg.Connection[Any], by: str, text: str) -> int:
    """A finished one-range document enqueued by role `by`, with one chunk and one summary of `text`."""
    row = conn.execute(
        "INSERT INTO documents (name, size, format, kind, parser, pages, content_digest, content, enqueued_by) "
        "VALUES ('d.md', 1, 'md', 'text', 'general', 1, %s, 'x', %s) RETURNING id", (uuid.uuid4().hex, by)).fetchone()
    assert row is not None
    task = one(conn, "INSERT INTO tasks (type, status, doc_id, from_page, to_page, enqueued_by, finished_at) "
                     "VALUES ('ui_ok', 'done', %s, 0, 1, %s, now()) RETURNING id", row[0], by)
    for level in (0, 1):
        conn.execute("INSERT INTO chunks (doc_id, task_id, level, position, from_page, to_page, text, token_count, "
                     "digest) VALUES (%s, %s, %s, 0, 0, 0, %s, 3, 'x')", (row[0], task, level, f"{text} {level}"))
    return int(row[0])


def test_producer_and_dashboard_logins_open_every_page(producer_url: str, dashboard_url: str, client: Client,
                                                      conn: psycopg.Connection[Any], clean: None) -> None:
    """A producer reads the views that only count tasks (overview, failures) but not worker_health (the
    workers page says so and lists the running tasks) and only its own documents' chunks; the dashboard
    reads everything."""
    producer = urlsplit(producer_url).username
    mine = _document_with_chunks(conn, producer or "", "mine")
    theirs = _document_with_chunks(conn, "someone_else", "theirs")
    failed = one(conn, "INSERT INTO tasks (type, status, last_error, finished_at, attempt, retry_count) "
                       "VALUES ('ui_fail', 'failed', 'ValueError: seen by all', now(), 1, 0) RETURNING id")
    conn.execute("INSERT INTO workers (id, host, pid, types, concurrency, last_seen) "
                 "VALUES ('w-prod', 'host-secret', 4242, '{ui_slow}', 4, now())")
    running = one(conn, "INSERT INTO tasks (type, status, worker_id, started_at, attempt, lease_expires_at) "
                        "VALUES ('ui_slow', 'running', 'w-prod', now(), 1, now() + interval '1 hour') RETURNING id")
    pages = [*PAGES, f"/tasks/{failed}", f"/documents/{mine}", f"/documents/{theirs}", f"/api/documents/{mine}",
             "/api/queues"]
    with TestClient(create_app(producer_url)) as prod, TestClient(create_app(dashboard_url)) as dash:
        for web in (prod, dash):
            for path in pages:
                r = web.get(path)
                assert r.status_code == 200, (path, r.text)
            assert "ui_fail" in web.get("/").text and "ValueError: seen by all" in web.get("/failures").text
            assert f'href="/tasks/{running}"' in web.get("/workers").text
        workers = prod.get("/workers").text
        assert 'id="no-workers"' in workers and "host-secret" not in workers and "4242" not in workers
        assert 'id="no-workers"' not in dash.get("/workers").text and "host-secret" in dash.get("/workers").text
        own, other = prod.get(f"/documents/{mine}").text, prod.get(f"/documents/{theirs}").text
        assert "mine 0" in own and "mine 1" in own and 'id="own-chunks"' in own  # its chunk and its summary
        assert "theirs" not in other and "No chunk yet" in other
        both = dash.get(f"/documents/{theirs}").text
        assert "theirs 0" in both and "theirs 1" in both and 'id="own-chunks"' not in both


def test_task_dependency_graph_and_document_summary_tree(web: TestClient, client: Client,
                                                         conn: psycopg.Connection[Any], clean: None) -> None:
    parent = client.enqueue("ui_ok", {})
    child = client.enqueue("ui_ok", {}, depends_on=[parent])

    def column(html: str, title: str) -> str:
        return html.split(f"<h3>{title}</h3>", 1)[1].split("</div>", 1)[0]

    assert f'href="/tasks/{child}"' in column(web.get(f"/tasks/{parent}").text, "needed by")
    child_page = web.get(f"/tasks/{child}").text
    assert f'href="/tasks/{parent}"' in column(child_page, "depends on")
    assert "nothing" in column(child_page, "needed by")

    doc = _document_with_chunks(conn, "someone", "leaf")
    root = one(conn, "INSERT INTO chunks (doc_id, level, position, from_page, to_page, text, token_count, digest) "
                     "VALUES (%s, 2, 0, 0, 0, 'the root', 2, 'r') RETURNING id", doc)
    conn.execute("UPDATE chunks SET parent_id = %s WHERE doc_id = %s AND level = 1", (root, doc))
    tree = web.get(f"/documents/{doc}").text.split("<h2>Summary tree</h2>", 1)[1]
    # the level-1 summary sits in a list nested inside the root's item
    assert re.search(r'<ul class="tree">\s*<li>.*?the root</div><ul class="tree">\s*<li>.*?leaf 1</div>', tree, re.S)
