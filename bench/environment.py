"""Per-peer virtualenvs, per-peer databases, and the facts recorded with every result."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / "peers"
VENVS_DIR = BENCH_DIR / ".venvs"


def driver_path(peer: str) -> Path:
    return PEERS_DIR / f"{peer}_driver.py"


def requirements_path(peer: str) -> Path:
    return PEERS_DIR / f"{peer}_requirements.txt"


def ensure_venv(peer: str, log: Callable[[str], None]) -> Path:
    """Create ``bench/.venvs/<peer>`` and install the peer's requirements; return its python.

    Re-installs only when the requirements file changes (its hash is kept in the venv).
    pip runs from the repository root, so a requirements file may say ``-e .``.
    """
    venv = VENVS_DIR / peer
    python = venv / "bin" / "python"
    reqs = requirements_path(peer)
    wanted = hashlib.sha256(reqs.read_bytes()).hexdigest() if reqs.exists() else "none"
    stamp = venv / ".bench-requirements.sha256"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"[{peer}] creating virtualenv {venv.relative_to(REPO_ROOT)}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    if reqs.exists():
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(reqs)]
        proc = subprocess.run(pip, cwd=REPO_ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"[{peer}] pip install failed:\n{proc.stdout}{proc.stderr}")
            raise subprocess.CalledProcessError(proc.returncode, pip)
    stamp.write_text(wanted)
    return python


def with_dbname(dsn: str, dbname: str) -> str:
    """The URL ``dsn`` pointing at database ``dbname`` instead."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("--dsn must be a postgresql:// URL")
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@dataclass(frozen=True)
class Server:
    """Admin access to the target server (through the ``--dsn`` database)."""

    dsn: str

    def recreate_database(self, name: str) -> str:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return with_dbname(self.dsn, name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def settings(self) -> dict[str, str]:
        names = [
            "server_version",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "wal_level",
            "shared_buffers",
            "max_connections",
        ]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            out: dict[str, str] = {}
            for name in names:
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                out[name] = str(row[0]) if row else "?"
        return out


def machine() -> dict[str, Any]:
    mem_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_bytes / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
