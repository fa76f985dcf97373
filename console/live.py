"""Live updates: ONE LISTEN connection per server process, however many browser tabs and API clients follow.

Workers notify ``<schema>.progress`` on every progress flush and completion (and a cancel notifies it
too). The hub holds the one connection that LISTENs there and wakes every open stream; each stream
then re-reads only its own rows (a few ids, by primary key) and sends what changed as server-sent
events. NOTIFY is a hint, not the only path: a stream also re-reads every ``poll_seconds`` (a claim,
queued to running, sends no NOTIFY), and the hub reconnects with backoff when its connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from jobqueue import TERMINAL, Listener

APPLICATION_NAME = "jobq-console-listen"
# Streams re-read at most this often, however many notifications arrive (a busy document sends many).
MIN_INTERVAL = 0.25
_DONE = {str(s) for s in TERMINAL}


class Hub:
    """The shared listener: a counter of notifications and an event that the next one sets. The
    connection (reconnect with backoff, ping, a half-open socket noticed) is jobq's own Listener."""

    def __init__(self, url: str, schema: str) -> None:
        self.notifications = 0
        self.connects = 0
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.listener = Listener(url, [f"{schema}.progress"], self._notify, self._connected,
                                 application_name=APPLICATION_NAME)

    def _connected(self) -> None:
        self.connects += 1
        self._notify()  # anything missed while disconnected is re-read now

    def _notify(self, *_args: Any) -> None:
        self.notifications += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> None:
        """Until the next notification, or `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.listener.run())

    async def stop(self) -> None:
        await self.listener.stop()
        if self._task is not None:
            self._task.cancel()  # it may be sleeping in a reconnect backoff
            await asyncio.gather(self._task, return_exceptions=True)


def sse(event: str, data: Any) -> str:
    """One server-sent event; JSON never holds a raw newline, so one data line suffices."""
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


async def stream(hub: Hub, read: Callable[[], Awaitable[list[dict[str, Any]]]], poll_seconds: float, *,
                 until_finished: bool = False) -> AsyncIterator[str]:
    """Each row once and again whenever it changes. With `until_finished` (one task or document, the
    API's streams) the stream ends with an ``end`` event once every row is finished."""
    sent: dict[tuple[str, int], dict[str, Any]] = {}
    yield ": jobq live\n\n"
    while True:
        rows = await read()
        for row in rows:
            key = (str(row["kind"]), int(row["id"]))
            if sent.get(key) != row:
                sent[key] = row
                yield sse(str(row["kind"]), row)
        if until_finished and rows and all(r["status"] in _DONE for r in rows):
            yield sse("end", {"status": [r["status"] for r in rows]})
            return
        await hub.wait(poll_seconds)
        await asyncio.sleep(MIN_INTERVAL)
