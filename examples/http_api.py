"""The HTTP API of `jobq ui`: enqueue a task and follow it with server-sent events, from any language.

This example starts the console in-process on a free loopback port (what `jobq ui` serves) and a worker,
then talks to the API with nothing but the standard library, as a client in another language would:
POST /api/tasks, then GET /api/tasks/{id}/events until its `end` event.

Needs the [ui] extra: pip install 'jobq[ui]'.  Run: python examples/http_api.py
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from typing import Any

import uvicorn

from jobq_console import create_app
from jobqueue import Context, task
from jobqueue.runtime.worker import Worker


@task("resize_image")
async def resize_image(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    for step in range(1, 5):
        ctx.progress(step / 4, f"pass {step} of 4")
        await asyncio.sleep(0.3)
    return {"width": payload["width"] // 2}


def call(base: str, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json", "X-Jobq-Client": "example"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def follow(base: str, task_id: int) -> list[dict[str, Any]]:
    """Every event of the task's stream, until it ends (the task finished)."""
    events: list[dict[str, Any]] = []
    with urllib.request.urlopen(f"{base}/api/tasks/{task_id}/events", timeout=60) as stream:
        kind = ""
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append({"event": kind, **json.loads(line[6:])})
                if kind == "end":
                    break
    return events


def main() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning", timeout_graceful_shutdown=2))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    worker = Worker(["resize_image"])
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    runner.start()
    try:
        while not server.started:
            threading.Event().wait(0.05)
        task_id = call(base, "POST", "/api/tasks", {"type": "resize_image", "payload": {"width": 640}})["id"]
        for e in follow(base, task_id):
            if e["event"] == "task":
                print(f"task {task_id}: {e['status']} {e['progress']:.0%} {e['message']}")
        final = call(base, "GET", f"/api/tasks/{task_id}")
        print(f"result: {final['result']}")
        return str(final["status"])
    finally:
        loop.call_soon_threadsafe(worker.stop)
        runner.join(30)
        server.should_exit = True


if __name__ == "__main__":
    main()
