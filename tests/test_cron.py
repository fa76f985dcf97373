"""Cron schedules: exactly one task per tick across schedulers, kills and restarts; backfill; declaration;
`jobq cron`. The clock is the test's: the scheduler takes `now` as a parameter."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import psycopg
import pytest
from support import SCHEMA, jobq_cli

from jobqueue import registry
from jobqueue.cron import Schedules, parse
from jobqueue.errors import ConfigurationError
from jobqueue.runtime.maintenance.scheduler import Scheduler

T0 = datetime(2026, 3, 28, 12, 0, 10, tzinfo=UTC)  # the day before Berlin's switch to summer time
CRONS = {  # name -> (expression, time zone)
    "every_minute": ("* * * * *", "UTC"),
    "every_5": ("*/5 * * * *", "Europe/Berlin"),
    "berlin_0215": ("15 2 * * *", "Europe/Berlin"),  # 02:15 does not exist on 2026-03-29 in Berlin
    "hourly_ny": ("7 * * * *", "America/New_York"),
}


@pytest.fixture
def schedules(conn: psycopg.Connection[Any]) -> Schedules:
    conn.execute("TRUNCATE tasks, schedules RESTART IDENTITY CASCADE")
    return Schedules(conn, SCHEMA)


def _add_all(conn: psycopg.Connection[Any], start: datetime) -> None:
    """The schedules, starting at `start` (the simulated clock), as `jobq cron add` writes them."""
    for name, (expr, tz) in CRONS.items():
        conn.execute("INSERT INTO schedules (name, type, cron, tz, next_tick) VALUES (%s, 'cron_t', %s, %s, %s)",
                     (name, expr, tz, parse(expr, tz).next_after(start)))


def _fired(conn: psycopg.Connection[Any]) -> dict[str, list[datetime]]:
    out: dict[str, list[datetime]] = {}
    for name, tick in conn.execute("SELECT schedule, tick FROM tasks WHERE schedule IS NOT NULL ORDER BY tick"):
        out.setdefault(name, []).append(tick)
    return out


async def _connect(db_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(db_url, server_settings={"search_path": f"{SCHEMA},public"})


def test_day_with_four_schedulers_and_kills_fires_every_tick_once(
        db_url: str, conn: psycopg.Connection[Any], schedules: Schedules) -> None:
    """24 simulated hours, 4 schedulers on their own connections passing concurrently every 30
    simulated seconds. Every few simulated minutes one of them is killed mid-pass (its transaction rolled
    back, or its connection terminated before the commit: kill -9), and every 3 hours all of them at
    once (a server restart). Every tick of every schedule is enqueued, and exactly once."""
    _add_all(conn, T0)
    end = T0 + timedelta(hours=24)
    rng = random.Random(15)

    async def main() -> None:
        conns = [await _connect(db_url) for _ in range(4)]
        scheds = [Scheduler(SCHEMA, every=30) for _ in range(4)]  # a pass every 30 simulated seconds
        kills = restarts = 0

        async def one(i: int, now: datetime, kill: str | None) -> None:
            c = conns[i]
            if kill is None:
                await scheds[i].run(c, now)
                return
            tx = c.transaction()
            await tx.start()
            await scheds[i].run(c, now)  # its ticks are written, not committed
            if kill == "rollback":
                await tx.rollback()
            else:  # the process dies: the server sees the connection drop and rolls back
                pid = c.get_server_pid()
                c.terminate()
                conns[i] = await _connect(db_url)
                # Its backend notices within milliseconds, i.e. well within one simulated step: wait for
                # it, so the simulated clock does not run minutes ahead while its locks are released.
                while await conns[i].fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                    await asyncio.sleep(0.005)

        now, step = T0, 0
        while now < end:
            now += timedelta(seconds=30)
            step += 1
            plan: list[str | None] = [None] * 4
            if step % 7 == 0:  # every 3.5 simulated minutes, one scheduler dies mid-pass
                plan[rng.randrange(4)] = rng.choice(["rollback", "terminate"])
                kills += 1
            if step % 360 == 0:  # every 3 simulated hours, all of them (the server restarts)
                plan = ["terminate"] * 4
                restarts += 1
            order = list(range(4))
            rng.shuffle(order)
            await asyncio.gather(*(one(i, now + timedelta(milliseconds=rng.randrange(500)), plan[i])
                                   for i in order))
        for i in range(4):  # after the last kill, the survivors' next pass
            await scheds[i].run(conns[i], end)
        for c in conns:
            await c.close()
        assert kills > 300 and restarts >= 7

    asyncio.run(main())
    fired = _fired(conn)
    for name, (expr, tz) in CRONS.items():
        expected = list(parse(expr, tz).ticks(T0, end))
        assert fired.get(name, []) == expected, name
    assert len(fired["every_minute"]) == 24 * 60
    # The 02:15 of the DST switch day does not exist in Berlin: croniter's choice, fired once.
    assert len(fired["berlin_0215"]) == 1
    dup = conn.execute("SELECT count(*) FROM (SELECT schedule, tick FROM tasks GROUP BY 1, 2 HAVING count(*) > 1) d")
    assert dup.fetchone()[0] == 0  # type: ignore[index]


def test_unique_key_refuses_a_tick_fired_before(conn: psycopg.Connection[Any], schedules: Schedules,
                                                db_url: str) -> None:
    """Even with the schedule's next_tick set back by hand, the tick is not enqueued twice."""
    _add_all(conn, T0)

    async def main() -> list[Any]:
        c = await _connect(db_url)
        try:
            first = await Scheduler(SCHEMA).run(c, T0 + timedelta(minutes=1))
            await c.execute("UPDATE schedules SET next_tick = next_tick - interval '1 minute' "
                            "WHERE name = 'every_minute'")
            again = await Scheduler(SCHEMA).run(c, T0 + timedelta(minutes=1))
            return [first, again]
        finally:
            await c.close()

    first, again = asyncio.run(main())
    assert [f.schedule for f in first] == ["every_minute"]
    assert again == []
    assert len(_fired(conn)["every_minute"]) == 1


@pytest.mark.parametrize(("backfill", "expected"), [(None, 1), (3, 3)])
def test_outage_backfills_the_latest_missed_ticks(conn: psycopg.Connection[Any], schedules: Schedules, db_url: str,
                                                  backfill: int | None, expected: int) -> None:
    """After a 2-hour outage a per-minute schedule fires its latest missed tick once (the default), or
    its latest `backfill` ticks; then it goes on from the next tick."""
    conn.execute("INSERT INTO schedules (name, type, cron, next_tick, backfill) VALUES ('m', 'cron_t', '* * * * *', "
                 "%s, %s)", (datetime(2026, 1, 1, 10, 1, tzinfo=UTC), backfill))
    back = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)

    async def main() -> None:
        c = await _connect(db_url)
        try:
            await Scheduler(SCHEMA).run(c, back)
            await Scheduler(SCHEMA).run(c, back + timedelta(minutes=1))
        finally:
            await c.close()

    asyncio.run(main())
    ticks = _fired(conn)["m"]
    latest = [datetime(2026, 1, 1, 12, 0, tzinfo=UTC) - timedelta(minutes=i) for i in range(expected)][::-1]
    assert ticks == [*latest, datetime(2026, 1, 1, 12, 1, tzinfo=UTC)]


def test_lookahead_enqueues_the_next_tick_to_run_on_time(conn: psycopg.Connection[Any], schedules: Schedules,
                                                        db_url: str) -> None:
    conn.execute("INSERT INTO schedules (name, type, cron, next_tick) VALUES ('m', 'cron_t', '* * * * *', %s)",
                 (datetime(2026, 1, 1, 10, 1, tzinfo=UTC),))

    async def main() -> None:
        c = await _connect(db_url)
        try:
            s = Scheduler(SCHEMA, every=5)
            assert await s.run(c, datetime(2026, 1, 1, 10, 0, 50, tzinfo=UTC)) == []
            await s.run(c, datetime(2026, 1, 1, 10, 0, 57, tzinfo=UTC))
        finally:
            await c.close()

    asyncio.run(main())
    row = conn.execute("SELECT tick, run_at, status FROM tasks").fetchall()
    tick = datetime(2026, 1, 1, 10, 1, tzinfo=UTC)
    assert row == [(tick, tick, "queued")]


def test_paused_schedule_fires_nothing_and_resumes_from_the_next_tick(
        conn: psycopg.Connection[Any], schedules: Schedules, db_url: str) -> None:
    schedules.add("ping", "cron_t", "* * * * *")
    schedules.set_paused("ping", True)
    far = datetime.now(UTC) + timedelta(hours=1)

    async def main(at: datetime) -> int:
        c = await _connect(db_url)
        try:
            return len(await Scheduler(SCHEMA).run(c, at))
        finally:
            await c.close()

    assert asyncio.run(main(far)) == 0
    schedules.set_paused("ping", False)
    (s,) = schedules.list()
    assert not s.paused and s.next_tick > datetime.now(UTC) - timedelta(seconds=1)
    assert asyncio.run(main(datetime.now(UTC))) == 0  # the ticks of the pause are not caught up
    schedules.remove("ping")
    assert schedules.list() == []


def test_code_declared_schedule_is_upserted_and_keeps_its_pause(
        conn: psycopg.Connection[Any], schedules: Schedules, db_url: str) -> None:
    @registry.task("cron_declared", cron="*/5 * * * *", tz="Europe/Berlin", cron_backfill=2)
    async def declared(ctx: Any, payload: Any) -> None:
        return None

    try:
        async def start() -> None:
            c = await _connect(db_url)
            try:
                s = Scheduler(SCHEMA, declare=[registry.get_type("cron_declared")])
                await s.run(c, datetime.now(UTC) - timedelta(days=1))  # nothing due yet
            finally:
                await c.close()

        asyncio.run(start())
        (s,) = schedules.list()
        assert (s.name, s.type, s.cron, s.tz, s.source, s.backfill) == (
            "cron_declared", "cron_declared", "*/5 * * * *", "Europe/Berlin", "code", 2)
        schedules.set_paused("cron_declared", True)
        asyncio.run(start())  # a worker restarts: the operator's pause stays
        assert schedules.list()[0].paused
    finally:
        registry.unregister("cron_declared")


def test_cron_task_whose_model_refuses_an_empty_payload_is_refused() -> None:
    from pydantic import BaseModel

    class Needs(BaseModel):
        path: str

    with pytest.raises(ConfigurationError, match="payload model Needs refuses"):
        registry.task("cron_model", cron="* * * * *", payload=Needs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cron": "*/5 * * *"}, "is not a valid cron expression"),
    ({"cron": "61 * * * *"}, "is not a valid cron expression"),
    ({"cron": "* * * * *", "tz": "Europe/Atlantis"}, "unknown time zone"),
    ({"tz": "UTC"}, "give cron= too"),
    ({"cron": "* * * * *", "cron_backfill": 0}, "backfill must be"),
])
def test_bad_schedules_are_refused_at_registration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        registry.task("cron_bad", **kwargs)
    with pytest.raises(registry.UnknownTaskType):
        registry.get_type("cron_bad")


def test_cli_cron_add_ls_pause_resume_rm(db_url: str, schedules: Schedules) -> None:
    env = {"JOBQ_DATABASE_URL": db_url, "COLUMNS": "200"}
    r = jobq_cli("cron", "add", "nightly", "--type", "cron_t", "--cron", "0 3 * * *", "--tz", "Europe/Berlin",
                 "--payload", '{"full": true}', env=env)
    assert r.returncode == 0, r.stderr
    r = jobq_cli("cron", "ls", env=env)
    assert r.returncode == 0 and "nightly" in r.stdout and "0 3 * * *" in r.stdout and "Europe/Berlin" in r.stdout
    assert jobq_cli("cron", "pause", "nightly", env=env).returncode == 0
    assert schedules.list()[0].paused
    assert jobq_cli("cron", "resume", "nightly", env=env).returncode == 0
    assert not schedules.list()[0].paused
    again = jobq_cli("cron", "add", "nightly", "--type", "cron_t", "--cron", "0 4 * * *", env=env)
    assert again.returncode == 1 and "exists already" in again.stderr
    assert jobq_cli("cron", "rm", "nightly", env=env).returncode == 0
    assert schedules.list() == []
    for args, message in ((("--cron", "0 3 * *"), "not a valid cron expression"),
                          (("--cron", "0 3 * * *", "--tz", "Nowhere/City"), "unknown time zone"),
                          (("--cron", "0 3 * * *", "--payload", "{"), "not valid JSON")):
        bad = jobq_cli("cron", "add", "bad", "--type", "cron_t", *args, env=env)
        assert bad.returncode == 1, bad.stderr
        assert message in bad.stderr and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert schedules.list() == []
    gone = jobq_cli("cron", "pause", "nope", env=env)
    assert gone.returncode == 1 and "no schedule named 'nope'" in gone.stderr


def test_top_shows_the_schedules_and_their_next_tick(db_url: str, conn: psycopg.Connection[Any],
                                                     schedules: Schedules) -> None:
    from jobqueue.cli.top import render_text
    from jobqueue.observe.snapshot import fetch

    schedules.add("nightly_report", "cron_t", "0 3 * * *", tz="Europe/Berlin")
    schedules.add("paused_one", "cron_t", "*/5 * * * *")
    schedules.set_paused("paused_one", True)
    snap = fetch(conn, SCHEMA)
    assert [s["name"] for s in snap.schedules] == ["nightly_report", "paused_one"]
    frame = render_text(snap, width=160)
    assert "cron schedules" in frame and "0 3 * * * (Europe/Berlin)" in frame and "paused" in frame
    assert snap.to_json()["schedules"][0]["next_tick"] == schedules.list()[0].next_tick.isoformat()


def test_worker_role_fires_ticks_without_insert_on_tasks(db_url: str, conn: psycopg.Connection[Any],
                                                         schedules: Schedules) -> None:
    """jobq_worker may not INSERT tasks: it enqueues a schedule's ticks through fire_ticks only; a
    producer may not write a task's schedule and tick."""
    assert jobq_cli("roles", env={"JOBQ_DATABASE_URL": db_url}).returncode == 0
    worker = f"{SCHEMA}_worker"

    @registry.task("cron_role", cron="* * * * *")
    async def declared(ctx: Any, payload: Any) -> None:
        return None

    async def main() -> int:
        c = await _connect(db_url)
        try:
            await c.execute(f"SET ROLE {worker}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await c.execute("INSERT INTO tasks (type) VALUES ('cron_role')")
            s = Scheduler(SCHEMA, declare=[registry.get_type("cron_role")])
            fired = len(await s.run(c, datetime.now(UTC) + timedelta(minutes=1, seconds=1)))
            await c.execute(f"RESET ROLE; SET ROLE {SCHEMA}_producer")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # a forged tick would take a real one's place
                await c.execute("INSERT INTO tasks (type, schedule, tick) VALUES ('cron_role', 'cron_role', now())")
            return fired
        finally:
            await c.close()

    try:
        assert asyncio.run(main()) == 1
    finally:
        registry.unregister("cron_role")
    row = conn.execute("SELECT type, schedule, status FROM tasks").fetchone()
    assert row == ("cron_role", "cron_role", "queued")


def test_0010_goes_down_and_up(server_url: str) -> None:
    """Down to 0006: schedules, the new columns and fire_ticks go, cancel_dependents is 0005's again;
    then up again to head."""
    from alembic import command
    from support import create_database, drop_database

    from jobqueue.admin.migrate import alembic_config, current, migrate

    url = create_database(server_url)
    try:
        migrate(url)
        command.downgrade(alembic_config(url), "0006")
        assert current(url) == "0006"
        with psycopg.connect(url, autocommit=True) as c:
            assert c.execute("SELECT to_regclass('schedules')").fetchone() == (None,)
            assert c.execute("SELECT count(*) FROM information_schema.columns WHERE table_schema = %s AND "
                             "table_name = 'tasks' AND column_name IN ('run_on', 'schedule', 'tick')",
                             (SCHEMA,)).fetchone() == (0,)
            parent = c.execute("INSERT INTO tasks (type, status) VALUES ('m', 'failed') RETURNING id").fetchone()
            assert parent is not None
            child = c.execute("INSERT INTO tasks (type, status, depends_on, pending_deps) VALUES "
                              "('m', 'waiting', %s, 1) RETURNING id", ([parent[0]],)).fetchone()
            assert c.execute("SELECT count(*) FROM cancel_dependents(%s, 'x', 100)", ([parent[0]],)).fetchone() == (1,)
            assert child is not None
        migrate(url)
        with psycopg.connect(url, autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM schedules_due").fetchone() == (0,)
    finally:
        drop_database(server_url, url)


def test_latest_ticks_include_a_tick_at_the_bound_and_none_after_it() -> None:
    every_second = parse("* * * * * *")  # a sixth field: seconds
    noon = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert every_second.latest(noon - timedelta(seconds=2), noon, 5) == [noon - timedelta(seconds=1), noon]
    before = noon - timedelta(microseconds=500)
    assert every_second.latest(noon - timedelta(seconds=2), before, 5) == [noon - timedelta(seconds=1)]
    assert every_second.latest(noon - timedelta(seconds=10), noon, 2) == [noon - timedelta(seconds=1), noon]
