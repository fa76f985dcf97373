"""Run every (peer, scenario) case, take medians, and write ``results.json`` / ``results.md``."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import pgbench_peer
from .environment import REPO_ROOT, Server, driver_path, ensure_venv, machine
from .report import render_markdown

PROFILES: dict[str, dict[str, int]] = {
    "short": {"n": 2_000, "runs": 1, "min_drain_s": 0},
    "full": {"n": 20_000, "runs": 3, "min_drain_s": 2},
}
# A drain shorter than the profile's min_drain_s times mostly the workers' start and the last stragglers,
# not their rate: its case is measured again with enough tasks to last about that long (at most this many).
MAX_DRAIN_N = 200_000
DRIVER_TIMEOUT_S = 900
LATENCY_KEYS = ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms")


@dataclass(frozen=True)
class Case:
    """One cell of the results table: a scenario at a process count and tuning."""

    key: str
    scenario: str
    processes: int
    tuned: bool


CASES: tuple[Case, ...] = (
    Case("enqueue_single", "enqueue_single", 1, False),
    Case("enqueue_concurrent", "enqueue_concurrent", 1, False),
    Case("enqueue_batch", "enqueue_batch", 1, False),
    Case("drain_1p_default", "drain", 1, False),
    Case("drain_1p_tuned", "drain", 1, True),
    Case("drain_2p_default", "drain", 2, False),
    Case("drain_2p_tuned", "drain", 2, True),
    Case("latency", "latency", 1, False),
    Case("cancel", "cancel", 1, False),
)
PGBENCH_KEYS = ("enqueue_single", "enqueue_batch", "drain_1p_default", "drain_2p_default")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def run_driver(python: Path, peer: str, case: Case, n: int, dsn: str) -> dict[str, Any]:
    """Invoke a peer driver once with the protocol's argv and parse its JSON line."""
    argv = [
        str(python),
        str(driver_path(peer)),
        case.scenario,
        str(n),
        str(case.processes),
        "1" if case.tuned else "0",
        dsn,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT_S,
            cwd=driver_path(peer).parent,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"driver timed out after {DRIVER_TIMEOUT_S}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _loggable(metric: dict[str, Any]) -> dict[str, Any]:
    """A metric without its raw samples (enqueue_concurrent nests the threads' metric, samples and all)."""
    return {k: _loggable(v) if isinstance(v, dict) else v for k, v in metric.items() if k != "raw_ms"}


def median_metric(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median over successful runs (throughput and each latency percentile)."""
    return _medians([r["metric"] for r in runs if r.get("ok")])


def _medians(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of the metrics' keys; a nested metric (enqueue_concurrent's ``threads``) likewise."""
    out: dict[str, Any] = {}
    for key in ("jobs_per_s", *LATENCY_KEYS):
        values = [m[key] for m in metrics if key in m]
        if values:
            out[key] = round(statistics.median(values), 3)
    nested = [m["threads"] for m in metrics if isinstance(m.get("threads"), dict)]
    if nested:
        out["threads"] = _medians(nested)
    return out


class Runner:
    def __init__(self, profile: str, peers: list[str], dsn: str, out: Path, argv: list[str],
                 cases: list[str] | None = None) -> None:
        self.profile = profile
        self.n = PROFILES[profile]["n"]
        self.runs = PROFILES[profile]["runs"]
        self.min_drain_s = PROFILES[profile]["min_drain_s"]
        self.peers = peers
        self.server = Server(dsn)
        self.out = out
        self.argv = argv
        unknown = set(cases or ()) - {c.key for c in CASES}
        if unknown:
            raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
        # A subset of the cases: one scenario measured side by side without the whole run.
        self.cases = [c for c in CASES if cases is None or c.key in cases]

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        doc: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m bench " + shlex.join(self.argv),
            "profile": self.profile,
            "n": self.n,
            "runs_per_case": self.runs,
            "min_drain_s": self.min_drain_s,
            "machine": machine(),
            "server": self.server.settings(),
            "cases": [c.key for c in self.cases],
            "peers": {},
            "notes": [],
        }
        for peer in self.peers:
            doc["peers"][peer] = self.run_peer(peer, doc["notes"])
        doc["total_seconds"] = round(time.monotonic() - started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        (self.out / "results.md").write_text(render_markdown(doc))
        log(f"wrote {self.out / 'results.json'} and {self.out / 'results.md'} in {doc['total_seconds']}s")
        return doc

    def run_peer(self, peer: str, notes: list[str]) -> dict[str, Any]:
        if peer == "pgbench":
            binary = pgbench_peer.pgbench_binary()
            if binary is None:
                notes.append("pgbench: skipped, no pgbench binary on PATH")
                return {"skipped": True}
            return self.run_cases(
                peer,
                [c for c in self.cases if c.key in PGBENCH_KEYS],
                lambda case, dsn, n: pgbench_peer.run_case(binary, dsn, case.scenario, n, case.processes),
            )
        if not driver_path(peer).exists():
            rel = driver_path(peer).relative_to(REPO_ROOT)
            notes.append(f"{peer}: skipped, driver {rel} does not exist")
            log(f"[{peer}] skipped: no {rel}")
            return {"skipped": True}
        try:
            python = ensure_venv(peer, log)
        except subprocess.CalledProcessError as exc:
            notes.append(f"{peer}: skipped, virtualenv setup failed ({exc})")
            return {"skipped": True}
        return self.run_cases(peer, self.cases, lambda case, dsn, n: run_driver(python, peer, case, n, dsn))

    def drain_n(self, case: Case, n: int, res: dict[str, Any]) -> int:
        """The tasks a drain case needs to last ``min_drain_s`` at the rate `res` measured with `n`
        (rounded up to 10,000s), or `n` when it lasted that long already. Each peer is measured at its
        own rate: the same 20,000 tasks were 52-73 s of procrastinate's drain and 0.4 s of jobq's, less
        than a worker process's start."""
        rate = (res.get("metric") or {}).get("jobs_per_s") or 0
        if case.scenario != "drain" or not self.min_drain_s or not rate or n / rate >= self.min_drain_s:
            return n
        wanted = rate * self.min_drain_s * 1.25
        return max(n, min(MAX_DRAIN_N, -(-int(wanted) // 10_000) * 10_000))

    def run_cases(self, peer: str, cases: list[Case],
                  invoke: Callable[[Case, str, int], dict[str, Any]]) -> dict[str, Any]:
        database = f"bench_{peer}"
        results: dict[str, Any] = {"cases": {}}
        try:
            for case in cases:
                runs: list[dict[str, Any]] = []
                n = self.n
                first: dict[str, Any] | None = None  # the run at the profile's n, when it was too short
                while len(runs) < self.runs:
                    dsn = self.server.recreate_database(database)
                    t0 = time.monotonic()
                    try:
                        res = invoke(case, dsn, n)
                    except Exception as exc:  # a failing case must not stop the others
                        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    log(
                        f"[{peer}] {case.key} run {len(runs) + 1}/{self.runs} ({time.monotonic() - t0:.1f}s): "
                        + json.dumps(_loggable(res.get("metric") or {}) or res.get("note") or res.get("error"))
                    )
                    if res.get("unsupported") or not res.get("ok"):
                        runs.append(res)
                        break  # don't repeat a scenario the peer lacks or that failed
                    if not runs and (bigger := self.drain_n(case, n, res)) > n:
                        log(f"[{peer}] {case.key}: {n:,} tasks drained in under {self.min_drain_s}s; "
                            f"measuring with {bigger:,}")
                        n, first = bigger, first or res
                        continue
                    runs.append(res)
                ok = [r for r in runs if r.get("ok")]
                results["cases"][case.key] = {
                    "n": n,
                    "at_profile_n": first,
                    "median": median_metric(runs),
                    "runs": runs,
                    "settings": ok[0].get("settings") if ok else None,
                    "server": ok[0].get("server") if ok else None,
                }
                if ok and "version" in ok[0]:
                    results["version"] = ok[0]["version"]
        finally:
            self.server.drop_database(database)
        return results
