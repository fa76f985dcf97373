"""The raw-SQL ceiling: pgbench scripts in ``bench/pgbench/`` against a minimal job table.

No Python touches the job path: pgbench itself issues every statement. Results use the
same metric shape as the peer drivers (``jobs_per_s``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from .environment import BENCH_DIR

SCRIPTS = BENCH_DIR / "pgbench"
CLAIM_BATCH = 100  # LIMIT in claim_complete.sql
INSERT_BATCH = 1000  # rows per transaction in enqueue_batch.sql
TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)


def pgbench_binary() -> str | None:
    found = shutil.which("pgbench")
    if found is None and Path("/usr/bin/pgbench").exists():
        found = "/usr/bin/pgbench"
    return found


def _psql_file(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((SCRIPTS / name).read_text())


def _vacuum(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE t")


def _run(binary: str, dsn: str, script: str, clients: int, transactions: int) -> float:
    cmd = [
        binary,
        "--no-vacuum",
        "--protocol=prepared",
        f"--file={SCRIPTS / script}",
        f"--client={clients}",
        f"--jobs={clients}",
        f"--transactions={transactions}",
        dsn,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    match = TPS_RE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return float(match.group(1))


def run_case(binary: str, dsn: str, scenario: str, n: int, processes: int) -> dict[str, Any]:
    """One run of a scenario on a fresh database ``dsn``; returns a driver-style result."""
    _psql_file(dsn, "schema.sql")
    result: dict[str, Any] = {"ok": True, "scenario": scenario, "version": "pgbench"}
    if scenario == "enqueue_single":
        tps = _run(binary, dsn, "enqueue_single.sql", 1, n)
        result["metric"] = {"n": n, "jobs_per_s": round(tps, 1)}
        result["settings"] = {"script": "enqueue_single.sql", "clients": 1, "rows_per_txn": 1}
    elif scenario == "enqueue_batch":
        tps = _run(binary, dsn, "enqueue_batch.sql", 1, max(1, n // INSERT_BATCH))
        result["metric"] = {"n": n, "jobs_per_s": round(tps * INSERT_BATCH, 1)}
        result["settings"] = {"script": "enqueue_batch.sql", "clients": 1, "rows_per_txn": INSERT_BATCH}
    elif scenario == "drain":
        _run(binary, dsn, "enqueue_batch.sql", 1, max(1, n // INSERT_BATCH))
        _vacuum(dsn)
        per_client = max(1, n // (CLAIM_BATCH * processes))
        tps = _run(binary, dsn, "claim_complete.sql", processes, per_client)
        result["metric"] = {
            "n": per_client * CLAIM_BATCH * processes,
            "jobs_per_s": round(tps * CLAIM_BATCH, 1),
        }
        result["settings"] = {
            "script": "claim_complete.sql",
            "clients": processes,
            "claim_batch": CLAIM_BATCH,
        }
    else:
        return {
            "ok": False,
            "unsupported": True,
            "scenario": scenario,
            "version": "pgbench",
            "note": "not applicable to raw SQL",
        }
    return result
