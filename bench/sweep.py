"""``python -m bench sweep``: jobq's drain over worker processes x concurrency, and the drain after a
mass cancel (issue 12, targets 7 and 8: no setting collapses).

Every point is one run of ``bench/peers/jobq_driver.py drain`` (a fresh ``bench_jobq`` database, N no-op
tasks queued, then P burst worker processes at concurrency C); a point below 80 % of the best point's
rate is flagged. ``mass_cancel`` enqueues and cancels M tasks first, then drains N new ones with one
worker at defaults; it is compared with the clean drain at the same setting.

    python -m bench sweep [--profile short|full] [--dsn URL] [--out bench/results/sweep]

Writes ``sweep.json`` and ``sweep.md`` (and the plots, bench/plots.py) into ``--out``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .environment import Server, ensure_venv, machine
from .orchestrator import Case, log, run_driver

FLAG_BELOW = 0.8  # a point below this fraction of the best rate is flagged
SWEEPS: dict[str, dict[str, Any]] = {
    # CI: a few points, small batches
    "short": {"n": 2_000, "runs": 1, "processes": (1, 2), "concurrency": (10, 100, 500),
              "mass_cancel": 10_000},
    # by hand: the whole grid of the issue, median of 3 (with prefetch a 20,000-task drain took 0.4-0.7 s)
    "full": {"n": 100_000, "runs": 3, "processes": (1, 2, 3, 4), "concurrency": (1, 10, 100, 500, 1000),
             "mass_cancel": 100_000},
}
DEFAULT_CONCURRENCY = 100  # jobq's default; the mass-cancel drain and its clean reference use it


def point(python: Path, server: Server, scenario: str, n: int, processes: int, conc: int, runs: int,
          extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Median jobs/s of `runs` runs of one setting (a fresh database each)."""
    rates: list[float] = []
    errors: list[str] = []
    env_before = dict(os.environ)
    os.environ.update({"BENCH_JOBQ_CONCURRENCY": str(conc), **(extra_env or {})})
    try:
        for _ in range(runs):
            dsn = server.recreate_database("bench_jobq")
            t0 = time.monotonic()
            res = run_driver(python, "jobq", Case(scenario, scenario, processes, False), n, dsn)
            if res.get("ok"):
                rates.append(float(res["metric"]["jobs_per_s"]))
            else:
                errors.append(str(res.get("error"))[:300])
            log(f"[sweep] {scenario} p={processes} c={conc} ({time.monotonic() - t0:.1f}s): "
                + json.dumps(res.get("metric") or res.get("error")))
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    out: dict[str, Any] = {"scenario": scenario, "processes": processes, "concurrency": conc, "runs": rates}
    if rates:
        out["jobs_per_s"] = round(statistics.median(rates), 1)
    if errors:
        out["errors"] = errors
    return out


def run_sweep(profile: str, dsn: str, out: Path) -> dict[str, Any]:
    cfg = SWEEPS[profile]
    server = Server(dsn)
    python = ensure_venv("jobq", log)
    started = time.monotonic()
    points = []
    try:
        for p in cfg["processes"]:
            for c in cfg["concurrency"]:
                points.append(point(python, server, "drain", cfg["n"], p, c, cfg["runs"]))
        clean = next((q for q in points if q["processes"] == 1 and q["concurrency"] == DEFAULT_CONCURRENCY), None)
        if clean is None:
            clean = point(python, server, "drain", cfg["n"], 1, DEFAULT_CONCURRENCY, cfg["runs"])
        mass = point(python, server, "mass_cancel", cfg["n"], 1, DEFAULT_CONCURRENCY, cfg["runs"],
                     {"BENCH_MASS_CANCEL": str(cfg["mass_cancel"])})
    finally:
        server.drop_database("bench_jobq")
    best = max((q.get("jobs_per_s", 0.0) for q in points), default=0.0)
    for q in points:
        q["of_best"] = round(q.get("jobs_per_s", 0.0) / best, 3) if best else None
        q["flagged"] = bool(best) and q.get("jobs_per_s", 0.0) < FLAG_BELOW * best
    mass["cancelled_first"] = cfg["mass_cancel"]
    if clean.get("jobs_per_s") and mass.get("jobs_per_s"):
        mass["of_clean"] = round(mass["jobs_per_s"] / clean["jobs_per_s"], 3)
    doc = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "profile": profile, "n": cfg["n"], "runs_per_point": cfg["runs"], "machine": machine(),
        "server": server.settings(), "load_average": os.getloadavg(), "best_jobs_per_s": best,
        "points": points, "mass_cancel": mass, "clean_reference": clean,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "sweep.md").write_text(render(doc))
    log(f"wrote {out / 'sweep.json'} and {out / 'sweep.md'}")
    return doc


def render(doc: dict[str, Any]) -> str:
    concs = sorted({q["concurrency"] for q in doc["points"]})
    procs = sorted({q["processes"] for q in doc["points"]})
    cell = {(q["processes"], q["concurrency"]): q for q in doc["points"]}
    load = ", ".join(f"{x:.1f}" for x in doc["load_average"])
    lines = [
        "# jobq drain sweep", "",
        f"- Date: {doc['date']} (UTC); profile `{doc['profile']}`: {doc['n']:,} no-op tasks per point, "
        f"{doc['runs_per_point']} run(s) per point (median); load average at the end {load}",
        f"- PostgreSQL {doc['server']['server_version']}, {doc['machine']['cores']} cores", "",
        "jobs/s by worker processes (rows) and concurrency per process (columns); **bold**: below "
        f"{FLAG_BELOW:.0%} of the best point ({doc['best_jobs_per_s']:,.0f} jobs/s)", "",
        "| processes | " + " | ".join(str(c) for c in concs) + " |",
        "|---:|" + "---:|" * len(concs),
    ]
    for p in procs:
        cells = []
        for c in concs:
            q = cell.get((p, c))
            if q is None or "jobs_per_s" not in q:
                cells.append("error" if q else "—")
            else:
                text = f"{q['jobs_per_s']:,.0f}"
                cells.append(f"**{text}**" if q["flagged"] else text)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    m, clean = doc["mass_cancel"], doc["clean_reference"]
    lines += ["", f"Drain of {doc['n']:,} after {m['cancelled_first']:,} tasks were enqueued and cancelled "
              f"(1 process, concurrency {m['concurrency']}): {m.get('jobs_per_s', 0):,.0f} jobs/s, "
              f"{m.get('of_clean', 0):.2f}x the clean drain ({clean.get('jobs_per_s', 0):,.0f} jobs/s)."]
    flagged = [q for q in doc["points"] if q["flagged"]]
    if flagged:
        lines += ["", "Flagged: " + ", ".join(f"{q['processes']}p x {q['concurrency']} ({q['of_best']:.2f})"
                                             for q in flagged)]
    return "\n".join(lines) + "\n"
