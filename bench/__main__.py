"""``python -m bench run``: side-by-side benchmarks of jobq's peers on one PostgreSQL server.

Usage::

    python -m bench startup [--dsn URL] [--runs 15] [--against REV]   (start-up times, bench/startup.py)
    python -m bench sweep [--profile short|full] [--dsn URL] [--out bench/results/sweep]   (bench/sweep.py)
    python -m bench profile [--n 20000] [--dsn URL] [--callgrind]   (worker CPU per task, bench/profile.py)
    python -m bench plots DIR   (PNGs from DIR/results.json and DIR/sweep.json, bench/plots.py)
    python -m bench run [--profile short|full] [--peers procrastinate,pgqueuer,celery,pgbench,jobq]
                        [--dsn postgresql://postgres@127.0.0.1:5432/test] [--out bench/results]

Peer-driver protocol (full text in ``bench/README.md``)
-------------------------------------------------------
A peer ``X`` is ``bench/peers/X_driver.py`` plus optional ``bench/peers/X_requirements.txt``
(installed with pip, from the repo root, into ``bench/.venvs/X``). The orchestrator runs::

    bench/.venvs/X/bin/python bench/peers/X_driver.py SCENARIO N PROCESSES TUNED DSN

with cwd ``bench/peers``, where SCENARIO is one of enqueue_single, enqueue_batch, enqueue_concurrent,
drain, latency, cancel; N the job count; PROCESSES the worker process count; TUNED
``0`` (peer defaults) or ``1`` (best documented settings); DSN a postgresql:// URL of a
fresh, empty database that the driver may fill as it likes. The driver prints exactly one
JSON line to stdout and exits 0::

    {"ok": true, "scenario": "drain", "version": "1.2.3",
     "metric": {"jobs_per_s": 1234.5, "n": 20000, "elapsed_s": 16.2},
     "settings": {...what was used...}}

``metric`` holds ``jobs_per_s`` for enqueue_*/drain and ``p50_ms``/``p95_ms``/``p99_ms``
for latency/cancel. A scenario the peer cannot do: ``{"ok": false, "unsupported": true,
"note": "..."}``. Anything else (non-zero exit, no JSON line) is recorded as an error.
A peer whose driver file does not exist is skipped with a note in the results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .orchestrator import PROFILES, Runner

DEFAULT_PEERS = "procrastinate,pgqueuer,celery,pgbench,jobq"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks and write results.json / results.md")
    run.add_argument("--profile", choices=sorted(PROFILES), default="short")
    run.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma-separated (default: {DEFAULT_PEERS})")
    run.add_argument(
        "--dsn",
        default=DEFAULT_DSN,
        help="admin URL on the target server; each peer gets its own bench_<peer> database there",
    )
    run.add_argument("--out", type=Path, default=Path("bench/results"))
    run.add_argument("--cases", help="comma-separated case keys to run (default: all), e.g. enqueue_batch")
    startup = sub.add_parser(
        "startup", help="median wall time of the read-only CLI commands and a worker's first claim")
    startup.add_argument("--dsn", default=DEFAULT_DSN, help="admin URL; a fresh database is made and dropped there")
    startup.add_argument("--runs", type=int, default=15)
    startup.add_argument("--against", metavar="REV", help="also time the jobqueue/ of this commit, interleaved")
    sweep = sub.add_parser("sweep", help="jobq's drain over processes x concurrency, and after a mass cancel")
    sweep.add_argument("--profile", choices=("short", "full"), default="short")
    sweep.add_argument("--dsn", default=DEFAULT_DSN)
    sweep.add_argument("--out", type=Path, default=Path("bench/results/sweep"))
    prof = sub.add_parser("profile", help="CPU microseconds per no-op task of one worker process, in-process")
    prof.add_argument("--n", type=int, default=20_000)
    prof.add_argument("--concurrency", type=int, default=100)
    prof.add_argument("--dsn", default=DEFAULT_DSN, help="admin URL; a fresh database is made and dropped there")
    prof.add_argument("--cprofile", action="store_true", help="also print the top functions (cProfile)")
    plots = sub.add_parser("plots", help="draw the PNGs of a results directory")
    plots.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "sweep":
        from .plots import draw
        from .sweep import run_sweep

        run_sweep(args.profile, args.dsn, args.out)
        draw(args.out)
        return 0
    if args.command == "profile":
        from .profile import main as profile_main

        return profile_main(args.dsn, args.n, args.concurrency, args.cprofile)
    if args.command == "plots":
        from .plots import draw

        draw(args.dir)
        return 0
    if args.command == "startup":
        from .startup import main as startup_main

        return startup_main(args.dsn, args.runs, args.against)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    Runner(args.profile, peers, args.dsn, args.out, argv, cases).run()
    try:
        from .plots import draw
    except ImportError:  # matplotlib is in the [bench] extra
        return 0
    draw(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
