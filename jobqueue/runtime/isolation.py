"""Process isolation for sync handlers (``@task(..., isolation="process")``).

Each attempt runs in a forked child process, so a segfault, an OOM kill or a runaway C extension in a
parser costs one attempt, not the worker; a cancel or a timeout kills the child outright (Oban's
preemptive model) instead of waiting for the handler to look at its flag. One task per child is the
``max-tasks-per-child = 1`` policy: no state leaks from one document to the next.

The child gets a context whose ``progress()`` sends messages up a pipe; the parent forwards them to
the real context, so progress coalescing and cancellation work as for thread handlers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

from jobqueue.errors import Cancelled, Fail, Snooze
from jobqueue.registry import TaskType
from jobqueue.runtime.context import ClaimedTask, Context

_mp = multiprocessing.get_context("fork")


class _ChildContext(Context):
    def __init__(self, task: ClaimedTask, pipe: Connection) -> None:
        import logging

        super().__init__(task, log=logging.getLogger("jobq.child"))
        self._pipe = pipe

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        self._pipe.send(("progress", fraction, message))


def _child_main(spec: TaskType, task: ClaimedTask, payload: Any, pipe: Connection) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        value = spec.handler(_ChildContext(task, pipe), payload)
        pipe.send(("result", value))
    except Snooze as exc:
        pipe.send(("snooze", exc.seconds, str(exc)))
    except BaseException as exc:  # everything must reach the parent as a message
        kind = "fail" if isinstance(exc, Fail) else "error"
        pipe.send((kind, type(exc).__name__, str(exc), traceback.format_exc(limit=-6)))
    finally:
        pipe.close()
        os._exit(0)


class ChildError(Exception):
    """An exception raised by a handler in its child process (type and traceback kept in the text)."""


async def run_in_process(spec: TaskType, ctx: Context, payload: Any) -> Any:
    recv, send = _mp.Pipe(duplex=False)
    proc = _mp.Process(target=_child_main, args=(spec, ctx.task, payload, send), daemon=True)
    proc.start()
    send.close()
    loop = asyncio.get_running_loop()
    messages: asyncio.Queue[Any] = asyncio.Queue()

    def readable() -> None:
        try:
            messages.put_nowait(recv.recv())
        except (EOFError, OSError):
            loop.remove_reader(recv.fileno())
            messages.put_nowait(("eof",))

    loop.add_reader(recv.fileno(), readable)
    try:
        while True:
            try:
                msg = await asyncio.wait_for(messages.get(), timeout=0.05)
            except TimeoutError:
                if ctx.is_cancelled:
                    raise Cancelled(f"task {ctx.id} cancelled ({ctx.cancel_reason}); child killed") from None
                continue
            kind = msg[0]
            if kind == "progress":
                ctx.progress(msg[1], msg[2])
            elif kind == "result":
                return msg[1]
            elif kind == "snooze":
                raise Snooze(msg[1], msg[2])
            elif kind == "fail":
                raise Fail(f"{msg[1]}: {msg[2]}")
            elif kind == "error":
                raise ChildError(f"{msg[1]}: {msg[2]}\n{msg[3]}")
            else:
                await loop.run_in_executor(None, proc.join, 1.0)
                code = proc.exitcode
                if code is not None and code < 0:
                    raise ChildError(f"handler process died with signal {-code}")
                raise ChildError(f"handler process exited with code {code} without a result")
    finally:
        loop.remove_reader(recv.fileno())
        recv.close()
        if proc.is_alive():
            proc.kill()
        await loop.run_in_executor(None, proc.join, 5.0)
