"""The reconnecting LISTEN connection (jobqueue.Listener) never ends silently: an unexpected error in a
connection's life is logged and the connection made again, so whoever relies on NOTIFY (a worker, the
process's waiters, the web console) does not fall back to polls for good."""

from __future__ import annotations

import asyncio

import psycopg

from jobqueue import Listener


def test_an_unexpected_error_on_connect_reconnects_and_notifications_flow_again(db_url: str) -> None:
    heard: list[str] = []
    connects = 0

    def on_connect() -> None:
        nonlocal connects
        connects += 1
        if connects == 1:
            raise RuntimeError("a bug in the caller's callback")

    async def main() -> None:
        listener = Listener(db_url, ["jobq_test_listener"], lambda _ch, payload: heard.append(payload), on_connect,
                            application_name="jobq-test-listener")
        task = asyncio.create_task(listener.run())
        try:
            for _ in range(200):
                if connects >= 2 and listener.connected.is_set():
                    break
                await asyncio.sleep(0.05)
            assert connects >= 2 and not task.done()  # the run survived the error and connected again
            with psycopg.connect(db_url, autocommit=True) as c:
                c.execute("SELECT pg_notify('jobq_test_listener', 'after')")
            for _ in range(100):
                if heard:
                    break
                await asyncio.sleep(0.05)
            assert heard == ["after"]
        finally:
            await listener.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
