"""`jobq enqueue --type` with a start time, parents and labels, and `jobq ls --label`, as a shell runs them.

    jobq enqueue --type report --payload '{"day": "2026-12-03"}' --run-at +10m --label nightly
    jobq enqueue --type report --run-at 2026-12-24T18:00:00+01:00 --label nightly
    jobq enqueue --type notify --depends-on 12,13 --run-on always --label nightly
    jobq ls --label nightly

--run-at takes an ISO time (UTC unless it carries an offset) or +DURATION (+90s, +10m, +2h, +1d);
--depends-on waits for the parent ids; --run-on always|failure runs it even when a parent failed.

Run: python examples/cli_enqueue.py
"""

from __future__ import annotations

import subprocess
import sys


def jobq(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "jobqueue", *args], capture_output=True, text=True,
                          env=None, check=True)
    return done.stdout.strip()


def main() -> list[str]:
    payload = '{"doc_id": 1, "from_page": 0, "to_page": 1}'  # a type every jobq install knows
    later = jobq("enqueue", "--type", "dataflow", "--payload", payload, "--run-at", "+10m", "--label", "nightly")
    xmas = jobq("enqueue", "--type", "dataflow", "--payload", payload, "--run-at", "2031-12-24T18:00:00+01:00",
                "--label", "nightly")
    after = jobq("enqueue", "--type", "dataflow", "--payload", payload, "--depends-on", f"{later},{xmas}",
                 "--run-on", "always", "--label", "nightly")
    print(jobq("ls", "--label", "nightly"))
    jobq("cancel", later, xmas, after)
    return [later, xmas, after]


if __name__ == "__main__":
    main()
