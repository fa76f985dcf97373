"""The chaos run in CI: the `short` profile of bench/chaos.py (same faults as the full run, ~40 s).

SIGKILLs of workers every 2 s, pg_terminate_backend of every backend, a server restart (embedded
server only: with JOBQ_TEST_DATABASE_URL the server is shared and is not restarted), a transaction
idle for the whole middle of the run, pools through PgBouncer when it is installed. The end-of-run
SQL must find every task terminal, none lost, one effect per done task and every extra attempt
explained. The last test proves those checks can fail: it breaks each invariant by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg
import pytest
from support import REPO

if str(REPO) not in sys.path:  # bench/ is a top-level package of the checkout, not installed
    sys.path.insert(0, str(REPO))

from bench import chaos


@pytest.fixture(scope="module")
def report(db_url: str, embedded_home: Path | None) -> chaos.Report:
    from jobqueue.admin import embedded

    restart = None
    if embedded_home is not None:
        home = embedded_home

        def restart() -> None:
            embedded.stop(home, mode="fast")
            embedded.ensure_running(home)

    try:
        rep = chaos.run(db_url, chaos.PROFILES["short"], name="short", restart=restart,
                        restart_skipped=None if restart else "shared server (JOBQ_TEST_DATABASE_URL)")
    finally:
        if embedded_home is not None:  # other test modules share the embedded server
            embedded.ensure_running(embedded_home)
    print(chaos.render(rep))
    return rep


def test_short_chaos_run_keeps_every_promise(report: chaos.Report, embedded_home: Path | None) -> None:
    assert report.invariants, "no invariant was checked"
    broken = {k: v for k, v in report.invariants.items() if not v}
    assert not broken, f"{broken}; violating rows: {report.violations}"
    assert report.kills >= 8  # one every 2 s for the whole backlog
    assert report.rescues_of_killed > 0 and report.runs >= report.by_status.get("done", 0)
    kinds = [f.kind for f in report.faults]
    assert kinds == (["pg_terminate_backend", "restart"] if embedded_home is not None else ["pg_terminate_backend"])
    assert report.idle_tx_held_s >= chaos.PROFILES["short"].idle_tx_seconds - 3
    assert report.by_status.get("cancelled", 0) > 0 and report.by_status.get("failed", 0) > 0


def test_the_checks_can_fail(db_url: str, report: chaos.Report) -> None:
    """Break each invariant on the finished run's rows; the same SQL must now report it."""
    with psycopg.connect(db_url, autocommit=True) as c:
        ids = [r[0] for r in c.execute("SELECT id FROM tasks ORDER BY id")]
        done_effect = c.execute("SELECT id, attempt FROM tasks WHERE status = 'done' AND type = 'chaos_quick' "
                                "LIMIT 3").fetchall()
        (a, att), (b, _), (d, _) = done_effect
        c.execute("INSERT INTO public.chaos_effects (task_id, attempt) VALUES (%s, %s)", (a, att))  # twice
        c.execute("UPDATE tasks SET status = 'queued' WHERE id = %s", (b,))  # not terminal
        c.execute("DELETE FROM tasks WHERE id = %s", (d,))  # lost (its effect row is orphaned)
        c.execute("UPDATE tasks SET attempt = attempt + 1 WHERE id = (SELECT min(id) FROM tasks "
                  "WHERE status = 'failed')")  # an unexplained attempt
        c.execute("UPDATE workers SET done = done + 1 WHERE id = (SELECT min(id) FROM workers)")
    again = chaos.Report(profile="tampered", tasks=report.tasks, workers=report.workers, pgbouncer=None)
    chaos.check(db_url, ids, [], again)
    failed = {k for k, v in again.invariants.items() if not v}
    assert {"every task terminal", "no task lost", "exactly one effect per done task, none otherwise",
            "no task done twice", "every extra attempt explained (rescue or logged error)"} <= failed
    assert again.violations["lost_tasks"] == 1 and again.violations["non_terminal"] == 1


def test_recovery_metric() -> None:
    """Recovery is measured, not assumed: a run that never regains its rate reports None."""
    before = [i / 100 for i in range(0, 1000)]  # 100/s for 10 s
    after_slow = [12 + i / 20 for i in range(0, 200)]  # 20/s after the fault
    fault = chaos.Fault("restart", started=10.0, back_up=11.0)
    assert chaos.recovery(before + after_slow, fault)["recovery_s"] is None
    after_fast = [11.5 + i / 120 for i in range(0, 1200)]  # 120/s from 0.5 s after the return
    rec = chaos.recovery(before + after_fast, fault)
    assert rec["pre_fault_rate"] == 100.0 and rec["recovery_s"] is not None and 0.3 <= rec["recovery_s"] <= 0.6
