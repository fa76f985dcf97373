"""An event loop in a daemon thread of its own, where the sync client sends its grouped enqueues.

Why a loop in a sync client: sixteen threads that each send their share of a group commit on psycopg
spend most of their time under the one GIL adapting parameters and handing the GIL back and forth
(docs/benchmarks.md, "Where a thread's call goes"). One thread that sends every waiting call on
asyncpg, whose protocol and array encoding are compiled, does that work once a statement while the
callers sleep on a lock. The loop starts at the first call that has to wait, so a process that never
enqueues from two threads at once never starts it (nor imports asyncpg). A forked child has none of
its parent's threads: the client gives it a LoopThread of its own (jobqueue/client/sync.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

CLOSE_TIMEOUT_S = 30.0  # how long close() waits for the loop's last statements


class LoopThread:
    """Starts coroutines on its loop from any thread; ``close()`` runs a last coroutine, then stops it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to its tasks

    def start_soon(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``fn()`` as a task on the loop, starting the loop if it is not running."""
        self._running().call_soon_threadsafe(self._spawn, fn)

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.get_running_loop().create_task(fn())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
                self._tasks = set()
            return self._loop

    def close(self, last: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Wait for the tasks started, run ``last()`` (closing what lives on the loop), stop the loop."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self._finish(last), loop).result(CLOSE_TIMEOUT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CLOSE_TIMEOUT_S)
            if not thread.is_alive():
                loop.close()

    async def _finish(self, last: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        await last()

