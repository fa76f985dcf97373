"""Periodic tasks: declared in code with @task(cron=...), or added at run time to the schedules table.

Every worker serving the type runs the scheduler after each heartbeat, and the database makes each tick
one task (a unique key on (schedule, tick)), however many workers there are and whichever of them dies.
A schedule added with `jobq cron add` (here: the same call in Python) needs no deploy.

This example uses 6-field expressions (the last field is seconds) so it finishes in seconds; a real
schedule reads like `@task("cleanup", cron="*/5 * * * *", tz="Europe/Berlin")`.

Run: python examples/cron.py
"""

from __future__ import annotations

import asyncio
from collections import Counter

from jobqueue import Context, Schedules, connect, get_settings, task
from jobqueue.runtime.worker import Worker

runs: Counter[str] = Counter()


@task("cleanup", cron="* * * * * */2", tz="Europe/Berlin")  # every 2 seconds, in Berlin's time
async def cleanup(ctx: Context, payload: dict[str, str]) -> None:
    runs[f"cleanup {payload.get('scope', 'all')}"] += 1


async def run(seconds: float) -> Counter[str]:
    schema = get_settings().schema_name
    with connect(autocommit=True) as conn:  # what `jobq cron add` does, from Python
        schedules = Schedules(conn, schema)
        if not any(s.name == "cleanup_tmp" for s in schedules.list()):
            schedules.add("cleanup_tmp", "cleanup", "* * * * * */3", payload={"scope": "tmp"})
    worker = Worker(["cleanup"], heartbeat_seconds=0.5)
    runner = asyncio.create_task(worker.run())
    await asyncio.sleep(seconds)
    worker.stop()
    await runner
    with connect(autocommit=True) as conn:
        schedules = Schedules(conn, schema)
        for s in schedules.list():
            print(f"{s.name:12} {s.cron:15} {s.tz:14} next {s.next_tick:%H:%M:%S} last task {s.last_task_id}")
        schedules.remove("cleanup_tmp")
    return runs


def main(seconds: float = 7.0) -> Counter[str]:
    done = asyncio.run(run(seconds))
    print(dict(done))
    return done


if __name__ == "__main__":
    main()
