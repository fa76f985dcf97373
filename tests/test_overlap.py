"""The overlap scenario of issue 11 in CI: the `short` profile of bench/overlap.py.

Many running tasks on a table with a history, heartbeats every 0.2 s, progress flushed every 0.05 s
and completions all overlapping: no deadlock reported by the server, no task failed or rescued as
"worker lost", no attempt beyond the first (nothing is killed, so any extra run is the worker's own).
"""

from __future__ import annotations

import sys
from pathlib import Path

from support import REPO

if str(REPO) not in sys.path:  # bench/ is a top-level package of the checkout, not installed
    sys.path.insert(0, str(REPO))

from bench import overlap


def test_short_overlap_run(db_url: str, tmp_path: Path) -> None:
    report = overlap.run(db_url, overlap.PROFILES["short"], "short", tmp_path)
    print(overlap.render(report))
    assert report.deadlocks == 0
    assert report.failed == 0 and report.lost == 0
    assert report.extra_attempts == 0
    assert report.worker_exits == [0] * overlap.PROFILES["short"].workers
    assert report.ok, overlap.render(report)
