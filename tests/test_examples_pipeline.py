"""examples/pipeline.py runs as documented: every sample document ends done, and a rerun reuses all."""

from __future__ import annotations

import os
import subprocess
import sys

from support import REPO


def run(db_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "examples" / "pipeline.py")], capture_output=True, text=True,
                          env={**os.environ, "JOBQ_DATABASE_URL": db_url}, timeout=240, cwd=REPO)


def test_pipeline_example(db_url: str) -> None:
    first = run(db_url)
    assert first.returncode == 0, first.stdout + first.stderr
    table = [line.split() for line in first.stdout.splitlines() if line.strip().endswith(tuple("0123456789"))
             and " done " in line]
    assert {row[1] for row in table} == {"guide.md", "handbook.pdf", "inventory.csv"}
    assert all(int(row[5]) > 0 and int(row[7]) > 0 for row in table)  # chunks and summaries
    second = run(db_url)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "worker: 0 task(s) done" in second.stdout and second.stdout.count("reused") == 3
