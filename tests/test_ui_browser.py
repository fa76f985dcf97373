"""The web console in a real browser: the distribution's Chromium (/usr/bin/chromium) driven by Playwright.

Every page loads without a console error (a Content-Security-Policy violation is one); a PDF uploaded
through the page's form shows its progress bar moving to done through the live stream, without a
reload; a running task is cancelled and a failed one retried with the page's buttons; a read-only
role sees no action. With JOBQ_UI_SCREENSHOTS=<folder> the test saves the screenshots docs/ui.md shows.

Skipped, with the reason, where /usr/bin/chromium is absent (`.ci/run` installs it) or Playwright is
not installed; Playwright never downloads a browser here.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import SAMPLES, BackgroundWorker, dashboard_login, drop_login, serve, wait_for

from jobqueue import Client, Context, Fail, task

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (apt-get install chromium; .ci/run does): browser tests skipped",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'jobq[test]')")
pytest.importorskip("fastapi", reason="the web console needs the [ui] extra")

from jobq_console import create_app  # noqa: E402

PAGES = ["/", "/tasks", "/documents", "/workers", "/failures"]


@task("br_slow")
async def br_slow(ctx: Context, payload: Any) -> None:
    for i in range(3000):
        ctx.progress(i / 3000, f"step {i} of 3000")
        await asyncio.sleep(0.005)


@task("br_quick")
async def br_quick(ctx: Context, payload: Any) -> Any:
    return {"ok": True}


@task("br_fail", max_retries=0)
async def br_fail(ctx: Context, payload: Any) -> None:
    raise Fail("br_fail: the input is not a document")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(db_url: str) -> Iterator[str]:
    with serve(create_app(db_url)) as base:
        yield base


class Tab:
    """A page that records every console error and uncaught exception."""

    def __init__(self, browser: Any, base: str) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def go(self, path: str) -> Any:
        response = self.page.goto(self.base + path)
        assert response is not None and response.status == 200, path
        return self.page

    def text(self, selector: str) -> str:
        return str(self.page.locator(selector).first.text_content() or "").strip()

    def shoot(self, name: str) -> None:
        folder = os.environ.get("JOBQ_UI_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(folder) / name), full_page=False)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any, site: str) -> Iterator[Tab]:
    t = Tab(browser, site)
    yield t
    t.close()


def test_upload_a_pdf_and_watch_its_progress_bar_reach_done(tab: Tab, client: Client) -> None:
    page = tab.go("/documents")
    page.set_input_files("input[name=files]", str(SAMPLES / "handbook.pdf"))
    page.click("#upload button[type=submit]")
    page.wait_for_url(re.compile(r"/documents\?msg="))
    flash = tab.text(".flash")
    found = re.search(r"handbook\.pdf: document (\d+), (\d+) task", flash)
    assert found, flash
    doc = int(found.group(1))
    tab.go(f"/documents/{doc}")
    status = f'[data-live-doc="{doc}"] [data-field="status"]'
    bar = f'[data-live-doc="{doc}"] progress'
    assert tab.text(status) == "queued"
    seen: list[float] = []
    with BackgroundWorker(["dataflow"], poll_seconds=0.2):  # started after the page: it sees every step
        def done() -> bool:
            seen.append(float(page.eval_on_selector(bar, "e => e.value")))
            return tab.text(status) == "done"

        wait_for(done, timeout=120, interval=0.05)
    seen.append(float(page.eval_on_selector(bar, "e => e.value")))  # set by the same event as the status
    assert seen[-1] == 1.0, seen
    assert any(0 < v < 1 for v in seen) or len(set(seen)) >= 2, seen  # the bar moved, not only jumped
    assert page.locator("#ranges .cell.st-done").count() == int(found.group(2))  # the strip followed too
    tab.go(f"/documents/{doc}")
    assert page.locator("#chunks tbody tr").count() > 1
    tab.shoot("ui-document.png")
    tab.go("/documents")
    tab.shoot("ui-documents.png")
    assert tab.errors == []


def test_every_page_loads_without_console_errors(tab: Tab, client: Client) -> None:
    failed = client.enqueue("br_fail", {"x": "<script>alert(1)</script>"})
    with BackgroundWorker(["br_fail"], poll_seconds=0.2):
        wait_for(lambda: client.get(failed).status == "failed")
    docs = client.list(type="dataflow", limit=1)
    paths = [*PAGES, f"/tasks/{failed}", "/tasks?status=failed", "/tasks?error=document"]
    if docs and docs[0].doc_id:
        paths.append(f"/documents/{docs[0].doc_id}")
    for path in paths:
        page = tab.go(path)
        assert page.locator("main h1").count() == 1, path
        page.wait_for_timeout(300)  # let the live stream open
    assert tab.errors == []
    tab.go("/")
    assert tab.page.evaluate("typeof alert") == "function"  # the page is alive ...
    assert "<script>alert(1)</script>" in tab.go(f"/tasks/{failed}").locator("#payload").text_content()
    # ... and the payload's script tag is text on the page, not an element
    assert tab.page.locator("main script").count() == 0


def test_cancel_a_running_task_from_its_page(tab: Tab, client: Client) -> None:
    tid = client.enqueue("br_slow", {})
    status = f'[data-live-task="{tid}"] [data-field="status"]'
    with BackgroundWorker(["br_slow"], poll_seconds=0.2):
        page = tab.go(f"/tasks/{tid}")
        wait_for(lambda: tab.text(status) == "running", timeout=30)  # the page follows the claim live
        wait_for(lambda: tab.text('[data-field="percent"]') not in ("0%", "1%", "2%"), timeout=30)  # and its bar
        tab.shoot("ui-task.png")
        page.click("button.danger")
        page.wait_for_url(re.compile(rf"/tasks/{tid}\?msg="))
        wait_for(lambda: tab.text(status) == "cancelled", timeout=30)
    assert client.get(tid).status == "cancelled"
    assert tab.errors == []


def test_retry_a_failed_task_from_its_page(tab: Tab, client: Client) -> None:
    tid = client.enqueue("br_fail", {})
    with BackgroundWorker(["br_fail"], poll_seconds=0.2):
        wait_for(lambda: client.get(tid).status == "failed")
    page = tab.go(f"/tasks/{tid}")
    assert "br_fail: the input is not a document" in tab.text("#last-error")
    page.click("button:has-text('Retry')")
    page.wait_for_url(re.compile(rf"/tasks/{tid}\?msg="))
    assert tab.text(f'[data-live-task="{tid}"] [data-field="status"]') == "queued"
    assert client.get(tid).status == "queued"
    assert tab.errors == []


def test_a_read_only_role_sees_no_action(browser: Any, db_url: str, client: Client) -> None:
    queued = client.enqueue("br_slow", {})
    viewer = dashboard_login(db_url)
    with serve(create_app(viewer)) as base:
        t = Tab(browser, base)
        try:
            for path in [*PAGES, f"/tasks/{queued}", "/tasks?type=br_slow&status=queued"]:
                page = t.go(path)
                assert page.locator("#read-only").count() == 1, path
                assert page.locator("form[method=post]").count() == 0, path
                assert page.locator("input[type=file]").count() == 0, path
                # no queue control, no bulk action
                assert page.locator("#bulk, .controls, button[name=action]").count() == 0, path
            assert t.go("/").locator('tr[data-queue="br_slow"]').count() == 1  # the queue is listed, not its controls
            assert t.errors == []
        finally:
            t.close()
    drop_login(db_url, viewer)
    client.cancel(queued)


def test_pause_and_resume_a_queue_from_the_overview(tab: Tab, client: Client) -> None:
    held = client.enqueue("br_quick", {"held": True})
    page = tab.go("/")
    row = 'tr[data-queue="br_quick"]'
    assert page.locator(f"{row} .badge.paused").count() == 0
    page.click(f"{row} button:has-text('Pause')")
    page.wait_for_url(re.compile(r"/\?msg="))
    assert "br_quick: paused" in tab.text(".flash")
    assert page.locator(f"{row} .badge.paused").count() == 1
    assert page.locator(f"{row} button:has-text('Resume')").count() == 1
    assert next(q for q in client.queues() if q.type == "br_quick").paused
    with BackgroundWorker(["br_quick", "br_fail"], poll_seconds=0.2):
        # the worker claims: a task of a type not paused is taken and finished ...
        probe = client.enqueue("br_fail", {})
        wait_for(lambda: client.get(probe).status == "failed", timeout=30)
        # ... while the paused type's task was in every one of its claims and stays queued
        assert client.get(held).status == "queued"
        tab.go("/")
        tab.shoot("ui-overview.png")
        page.click(f"{row} button:has-text('Resume')")
        page.wait_for_url(re.compile(r"/\?msg="))
        assert "br_quick: active" in tab.text(".flash")
        assert page.locator(f"{row} .badge.paused").count() == 0
        wait_for(lambda: client.get(held).status == "done", timeout=30)
    assert not next(q for q in client.queues() if q.type == "br_quick").paused
    assert tab.errors == []


def test_bulk_cancel_a_filtered_selection_from_the_tasks_page(tab: Tab, client: Client) -> None:
    label = f"bulk-{uuid.uuid4().hex[:6]}"
    chosen = [client.enqueue("br_slow", {}, labels=[label]) for _ in range(3)]
    other = client.enqueue("br_slow", {})
    page = tab.go(f"/tasks?label={label}&status=queued")
    assert page.locator("#tasks tbody tr").count() == 3
    tab.shoot("ui-tasks.png")
    page.click("#bulk button[value=cancel]")
    page.wait_for_url(re.compile(r"/tasks\?status=queued&label=.*&msg="))
    assert "cancel: 3 task(s) affected (3 cancelled)" in tab.text(".flash")
    assert page.locator("#tasks tbody tr").count() == 1  # the same filters (queued): nothing left but the note
    tab.go(f"/tasks?label={label}")
    assert page.locator('#tasks [data-field="status"]').all_text_contents() == ["cancelled"] * 3
    assert {client.get(i).status for i in chosen} == {"cancelled"}
    assert client.get(other).status == "queued"  # outside the selection
    client.cancel(other)
    assert tab.errors == []
