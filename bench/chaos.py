"""Chaos run: prove that nothing is lost, nothing completes twice and every task ends visible.

``python -m bench.chaos --profile full`` enqueues 10,000 tasks of mixed types and priorities
(bench/chaos_handlers.py), runs several ``jobq worker`` processes and, while they work:

- kills a random worker with SIGKILL every 2 s and starts a replacement (leases + rescue);
- terminates every backend of the database once with ``pg_terminate_backend``;
- restarts PostgreSQL once (the embedded server; or an external one when ``--restart-cmd`` is
  given and nobody else is connected to it);
- holds one connection idle in transaction for 60 s (pins the xmin horizon, blocks vacuum);
- sends the workers' pools through PgBouncer in transaction mode (started here, on loopback, with
  a generated config), while their LISTEN connection goes straight to PostgreSQL (JOBQ_LISTEN_URL);
- cancels a few tasks, some queued and some running.

At the end plain SQL checks the invariants (see :func:`check`) and the run reports the figures
(kills, rescues, restarts, recovery of throughput after each database fault). The test suite runs
the ``short`` profile (tests/test_chaos.py); docs/reliability.md holds the figures of a full run.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bench.chaos_handlers import DDL, EFFECT_TYPES, TYPES
from bench.schema import SCHEMA, use_schema

REPO = Path(__file__).resolve().parent.parent
LIVE = ("waiting", "queued", "running")
TERMINAL = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Profile:
    """How big and how hostile a run is. Fault times are seconds after the workers start."""

    tasks: int
    workers: int
    concurrency: int
    kill_every: float
    idle_tx_at: float
    idle_tx_seconds: float
    terminate_at: float
    restart_at: float
    cancel_at: float
    cancels: int
    timeout: float
    lease_seconds: float = 3.0
    heartbeat_seconds: float = 1.0
    # Mean handler time per type in seconds; the mix sets how long the backlog lasts.
    mix: tuple[tuple[str, float, float], ...] = (
        ("chaos_quick", 0.62, 0.15),
        ("chaos_slow", 0.10, 1.0),
        ("chaos_sync", 0.24, 0.2),
        ("chaos_fail", 0.04, 0.0),
    )


PROFILES = {
    # About 90 s of backlog: every fault lands while tasks are queued, the idle transaction spans most of it.
    "full": Profile(
        tasks=10_000,
        workers=4,
        concurrency=8,
        kill_every=2.0,
        idle_tx_at=3.0,
        idle_tx_seconds=60.0,
        terminate_at=18.0,
        restart_at=38.0,
        cancel_at=8.0,
        cancels=60,
        timeout=600.0,
    ),
    # The CI version (tests/test_chaos.py): the same faults, compressed into ~35 s.
    "short": Profile(
        tasks=2_400,
        workers=3,
        concurrency=8,
        kill_every=2.0,
        idle_tx_at=1.0,
        idle_tx_seconds=12.0,
        terminate_at=9.0,
        restart_at=19.0,
        cancel_at=4.0,
        cancels=20,
        timeout=150.0,
    ),
}


class RestartSkipped(Exception):
    """Raised by a restart callable that found it unsafe to restart the server right now."""


@dataclass
class Fault:
    kind: str
    started: float
    back_up: float
    detail: str = ""


@dataclass
class Report:
    profile: str
    tasks: int
    workers: int
    pgbouncer: str | None
    duration_s: float = 0.0
    kills: int = 0
    unexpected_exits: int = 0
    startup_refused: int = 0
    faults: list[Fault] = field(default_factory=list)
    restart_skipped: str | None = None
    by_status: dict[str, int] = field(default_factory=dict)
    rescues: int = 0
    rescues_of_killed: int = 0
    rescues_of_live: int = 0
    error_retries: int = 0
    extra_attempts: int = 0
    runs: int = 0
    effects: int = 0
    cancels_requested: dict[str, int] = field(default_factory=dict)
    idle_tx_held_s: float = 0.0
    idle_tx_interruptions: int = 0
    max_dead_tuples: int = 0
    max_backends: int = 0
    leaked_advisory_locks: int = 0
    recovery: list[dict[str, Any]] = field(default_factory=list)
    invariants: dict[str, bool] = field(default_factory=dict)
    violations: dict[str, int] = field(default_factory=dict)
    worker_tracebacks: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.invariants) and all(self.invariants.values())


# ---------------------------------------------------------------- helpers


def _q(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


class PgBouncer:
    """Debian's pgbouncer on loopback in transaction pooling mode, in front of one database."""

    def __init__(self, direct_url: str, workdir: Path, pool_size: int = 12) -> None:
        self.binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        info = conninfo_to_dict(direct_url)
        self.dbname = str(info.get("dbname"))
        self.port = _free_port()
        self.dir = workdir / "pgbouncer"
        self.dir.mkdir(parents=True, exist_ok=True)
        user = str(info.get("user") or "postgres")
        upstream = (
            f"host={info.get('host') or '127.0.0.1'} port={info.get('port') or 5432} dbname={self.dbname} user={user}"
        )
        # server_login_retry: pgbouncer's default (15 s) makes clients wait that long after a failed
        # connect while the server restarts; 1 s lets the pool come back within a second of it.
        (self.dir / "pgbouncer.ini").write_text(f"""[databases]
{self.dbname} = {upstream}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / "users.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
server_login_retry = 1
query_wait_timeout = 120
ignore_startup_parameters = extra_float_digits
logfile = {self.dir / "pgbouncer.log"}
pidfile = {self.dir / "pgbouncer.pid"}
admin_users = {user}
""")
        (self.dir / "users.txt").write_text(f'"{user}" ""\n')
        self.url = f"postgresql://{user}@127.0.0.1:{self.port}/{self.dbname}"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists())

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=False).stdout
        return out.splitlines()[0].strip() if out else "pgbouncer"

    def start(self) -> None:
        cmd = [self.binary, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root: drop to the server's user
            user = next(u for u in ("jobq", "postgres", "nobody") if _user_exists(u))
            pw = pwd.getpwnam(user)
            for p in [self.dir, *self.dir.iterdir()]:
                os.chown(p, pw.pw_uid, pw.pw_gid)
            _make_traversable(self.dir)
            cmd[1:1] = ["-u", user]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2, prepare_threshold=None) as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_tail = (
                        (self.dir / "pgbouncer.log").read_text()[-500:] if (self.dir / "pgbouncer.log").exists() else ""
                    )
                    raise RuntimeError(f"pgbouncer did not start: {log_tail}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _make_traversable(path: Path) -> None:
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            p.chmod(mode | 0o001)


class IdleTransaction(threading.Thread):
    """Holds a transaction with an xid open and idle for `seconds` (re-opened if a fault kills it):
    the long transaction that pins the xmin horizon and stops vacuum."""

    def __init__(self, url: str, seconds: float) -> None:
        super().__init__(daemon=True, name="chaos-idle-tx")
        self.url = url
        self.seconds = seconds
        self.pid: int | None = None
        self.held = 0.0
        self.interruptions = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.seconds
        while time.monotonic() < end and not self.stop_event.is_set():
            opened = time.monotonic()
            try:
                with psycopg.connect(self.url, connect_timeout=3) as conn:
                    conn.execute("SELECT txid_current()")
                    self.pid = conn.info.backend_pid
                    opened = time.monotonic()
                    while time.monotonic() < end and not self.stop_event.wait(1.0):
                        conn.execute("SELECT 1")  # notices a killed connection; stays in the transaction
                    self.held += time.monotonic() - opened
                    conn.rollback()
            except psycopg.Error:
                self.held += max(0.0, time.monotonic() - opened - 1.0)
                self.interruptions += 1
                self.pid = None
                time.sleep(0.2)


class Workers:
    """The worker processes; kill -9 of a random one every `every` seconds, a replacement at once."""

    def __init__(self, profile: Profile, env: dict[str, str], logdir: Path, rnd: random.Random) -> None:
        self.profile = profile
        self.env = env
        self.logdir = logdir
        self.rnd = rnd
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.seq = 0
        self.killed: list[str] = []
        self.unexpected: list[tuple[str, int | None]] = []
        self.lock = threading.Lock()
        self.stop_killing = threading.Event()
        self.thread = threading.Thread(target=self._killer, daemon=True, name="chaos-killer")

    def spawn(self) -> str:
        self.seq += 1
        name = f"chaos-{self.seq}"
        cmd = [
            sys.executable,
            "-m",
            "jobqueue",
            "worker",
            "--types",
            ",".join(TYPES),
            "--import",
            "bench.chaos_handlers",
            "--concurrency",
            str(self.profile.concurrency),
            "--name",
            name,
        ]
        fh = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child from here on
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        fh.close()
        return name

    def start(self) -> None:
        for _ in range(self.profile.workers):
            self.spawn()
        self.thread.start()

    def _killer(self) -> None:
        while not self.stop_killing.wait(self.profile.kill_every):
            with self.lock:
                self._reap()
                alive = [n for n, p in self.procs.items() if p.poll() is None]
                if not alive:
                    continue
                victim = self.rnd.choice(alive)
                proc = self.procs.pop(victim)
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                self.killed.append(victim)
                self.spawn()

    def _reap(self) -> None:
        """A worker that exits on its own during the run is a defect: count it, replace it."""
        for name, p in list(self.procs.items()):
            if p.poll() is not None:
                self.unexpected.append((name, p.returncode))
                del self.procs[name]
                self.spawn()

    def stop(self) -> None:
        self.stop_killing.set()
        self.thread.join(30)
        with self.lock:
            self._reap()
            for p in self.procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in self.procs.values():
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)

    def startup_refusals(self) -> list[str]:
        """Unexpected exits of `jobq worker` before its runtime started: the command checks the schema
        once at start-up and exits with one error line when the database is unreachable (a replacement
        started while PostgreSQL restarts). Anything else that exits is a worker that died."""
        refused = []
        for name, _code in self.unexpected:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if len(lines) == 1 and lines[0].lower().startswith("error:") and f"{SCHEMA}." not in text:
                refused.append(name)
        return refused

    def tracebacks(self) -> int:
        """Tracebacks that ended a worker process (they pass through runpy's main). asyncpg's pool logs
        its own failed reconnects with a traceback at WARNING level while the server is down; those
        are retries, not crashes, and are not counted."""
        return sum(f.read_bytes().count(b'File "<frozen runpy>"') for f in self.logdir.glob("*.log"))


# ---------------------------------------------------------------- the run


def enqueue(url: str, profile: Profile, rnd: random.Random) -> list[int]:
    from jobqueue import Client, TaskSpec

    by_type: dict[str, list[TaskSpec]] = {t: [] for t in TYPES}
    names = [m[0] for m in profile.mix]
    weights = [m[1] for m in profile.mix]
    means = {m[0]: m[2] for m in profile.mix}
    for _ in range(profile.tasks):
        t = rnd.choices(names, weights)[0]
        seconds = round(rnd.uniform(0.5, 1.5) * means[t], 3)
        by_type[t].append(TaskSpec(payload={"s": seconds}, priority=rnd.randint(-5, 10)))
    ids: list[int] = []
    with Client(url) as client:
        for t, specs in by_type.items():
            if specs:
                ids.extend(client.enqueue_many(t, specs))
    return ids


def run(
    url: str,
    profile: Profile,
    *,
    name: str = "custom",
    restart: Callable[[], None] | None = None,
    restart_skipped: str | None = None,
    use_pgbouncer: bool | None = None,
    workdir: Path | None = None,
    seed: int = 7,
    log: Callable[[str], None] = print,
) -> Report:
    """One chaos run against `url` (a migrated, empty jobq database reached directly).

    `restart` restarts the server (None: the restart step is skipped, e.g. a shared server).
    """
    rnd = random.Random(seed)
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="jobq-chaos-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    if use_pgbouncer is None:
        use_pgbouncer = PgBouncer.available()
    bouncer = PgBouncer(url, work) if use_pgbouncer else None
    report = Report(
        profile=name,
        tasks=profile.tasks,
        workers=profile.workers,
        pgbouncer=bouncer.version() if bouncer else None,
        restart_skipped=restart_skipped,
    )
    use_schema(url)  # the checks below name tables unqualified
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute("TRUNCATE public.chaos_runs, public.chaos_effects")
    ids = enqueue(url, profile, rnd)
    log(f"enqueued {len(ids)} tasks; pgbouncer: {report.pgbouncer or 'not used'}")

    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQ_") or k == "JOBQ_SCHEMA"}
    env.update(
        JOBQ_DATABASE_URL=bouncer.url if bouncer else url,
        JOBQ_LISTEN_URL=url,
        JOBQ_LEASE_SECONDS=str(profile.lease_seconds),
        JOBQ_HEARTBEAT_SECONDS=str(profile.heartbeat_seconds),
        JOBQ_GRACE_SECONDS="5",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    if bouncer:
        env["JOBQ_PREPARED_STATEMENTS"] = "false"  # pgbouncer < 1.21 cannot keep them in transaction mode
    workers = Workers(profile, env, work / "logs", rnd)
    holder = IdleTransaction(url, profile.idle_tx_seconds)
    monitor = _Monitor(url)
    try:
        if bouncer:
            bouncer.start()
        t0 = time.time()
        workers.start()
        pending = {"cancel", "idle", "terminate"} | ({"restart"} if restart else set())
        while True:
            el = time.time() - t0
            if "cancel" in pending and el >= profile.cancel_at:
                pending.discard("cancel")
                report.cancels_requested = _cancel_some(url, ids, profile.cancels, rnd)
                log(f"{el:5.1f}s cancelled {report.cancels_requested}")
            if "idle" in pending and el >= profile.idle_tx_at:
                pending.discard("idle")
                holder.start()
                log(f"{el:5.1f}s holding a transaction idle for {profile.idle_tx_seconds:.0f}s")
            if "terminate" in pending and el >= profile.terminate_at:
                pending.discard("terminate")
                now = time.time()
                n = _terminate_all(url, holder.pid)
                report.faults.append(Fault("pg_terminate_backend", now, now, f"{n} backends"))
                log(f"{el:5.1f}s terminated {n} backends")
            if "restart" in pending and el >= profile.restart_at and restart is not None:
                pending.discard("restart")
                down = time.time()
                try:
                    restart()
                except RestartSkipped as exc:
                    report.restart_skipped = str(exc)
                    log(f"{el:5.1f}s restart skipped: {exc}")
                else:
                    up = time.time()
                    report.faults.append(Fault("restart", down, up, f"down {up - down:.2f}s"))
                    log(f"{el:5.1f}s restarted PostgreSQL ({up - down:.2f}s)")
            live, queued = monitor.sample()
            if queued == 0 and not workers.stop_killing.is_set() and not pending:
                workers.stop_killing.set()  # backlog gone: let the last rescues finish in peace
                log(f"{el:5.1f}s backlog empty after {len(workers.killed)} kills; waiting for the rest")
            if live == 0 and not pending:
                break
            if el > profile.timeout:
                log(f"timeout: {live} task(s) still live after {el:.0f}s")
                break
            time.sleep(0.25)
        report.duration_s = time.time() - t0
        if pending:
            log(f"faults not reached while tasks were live: {sorted(pending)}")
        report.leaked_advisory_locks = monitor.advisory_locks()
    finally:
        workers.stop()
        holder.stop_event.set()
        holder.join(10)
        if bouncer:
            bouncer.stop()
        monitor.close()
    report.kills = len(workers.killed)
    report.startup_refused = len(workers.startup_refusals())
    report.unexpected_exits = len(workers.unexpected) - report.startup_refused
    report.worker_tracebacks = workers.tracebacks()
    report.idle_tx_held_s = round(holder.held, 1)
    report.idle_tx_interruptions = holder.interruptions
    report.max_dead_tuples = monitor.max_dead
    report.max_backends = monitor.max_backends
    check(url, ids, workers.killed, report, faults_pending=bool(pending))
    if own_dir and report.ok:
        shutil.rmtree(work, ignore_errors=True)
    elif not report.ok:
        log(f"worker logs kept in {work / 'logs'}")
    return report


class _Monitor:
    """Samples the queue during the run on its own direct connection (reconnecting after faults)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.Connection[Any] | None = None
        self.max_dead = 0
        self.max_backends = 0
        self.last = (1, 1)

    def _c(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
        return self.conn

    def sample(self) -> tuple[int, int]:
        try:
            c = self._c()
            live, queued = c.execute(
                "SELECT count(*) FILTER (WHERE status = ANY(%s)), count(*) FILTER (WHERE status = 'queued') "
                "FROM tasks",
                (list(LIVE),),
            ).fetchone() or (1, 1)
            dead = _q(c, "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass")
            backends = _q(
                c,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend'",
            )
            self.max_dead = max(self.max_dead, int(dead or 0))
            self.max_backends = max(self.max_backends, int(backends))
            self.last = (int(live), int(queued))
        except psycopg.Error:
            self.conn = None  # the server is restarting or our backend was terminated
        return self.last

    def advisory_locks(self) -> int:
        """Session-level advisory locks still held by someone while the workers idle (a lock taken and
        released in two statements behind a transaction pooler can stay with a pooled server session)."""
        try:
            return int(
                _q(
                    self._c(),
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                )
            )
        except psycopg.Error:
            return -1

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _cancel_some(url: str, ids: list[int], n: int, rnd: random.Random) -> dict[str, int]:
    from jobqueue import Client

    with psycopg.connect(url, autocommit=True) as c:
        running = [
            r[0]
            for r in c.execute(
                "SELECT id FROM tasks WHERE status = 'running' AND type <> 'chaos_fail' "
                "ORDER BY random() LIMIT %s",
                (n // 2,),
            )
        ]
        queued = [
            r[0]
            for r in c.execute(
                "SELECT id FROM tasks WHERE status = 'queued' AND type <> 'chaos_fail' ORDER BY random() LIMIT %s",
                (n - len(running),),
            )
        ]
    out: dict[str, int] = {}
    with Client(url) as client:
        for status in client.cancel(running + queued).values():
            out[status] = out.get(status, 0) + 1
    return out


def _terminate_all(url: str, spare: int | None) -> int:
    """Terminate every client backend of this database (workers, pgbouncer's server connections,
    LISTEN connections, handlers' pools) except our own and the idle-transaction holder."""
    with psycopg.connect(url, autocommit=True) as c:
        return int(
            _q(
                c,
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> %s "
                "AND backend_type = 'client backend') t",
                spare or 0,
            )
        )


# ---------------------------------------------------------------- invariants and figures

INVARIANTS: dict[str, str] = {
    # every task is in a terminal state a user can see
    "non_terminal": "SELECT count(*) FROM tasks WHERE status NOT IN ('done', 'failed', 'cancelled')",
    # a done task of an effect type has exactly one effect row, written by the attempt that completed it
    "done_without_exactly_one_effect": """
        SELECT count(*) FROM tasks t WHERE t.status = 'done' AND t.type = ANY(%(effect_types)s)
          AND (SELECT count(*) FROM public.chaos_effects e WHERE e.task_id = t.id) <> 1""",
    "effect_of_other_attempt": """
        SELECT count(*) FROM public.chaos_effects e JOIN tasks t ON t.id = e.task_id
        WHERE t.status <> 'done' OR e.attempt <> t.attempt""",
    "orphan_effects": """
        SELECT count(*) FROM public.chaos_effects e
        WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id)""",
    # no task done twice: the workers' done counters (bumped in the completing statement) add up
    "done_counter_mismatch": """
        SELECT abs((SELECT coalesce(sum(done), 0) FROM workers)
                   - (SELECT count(*) FROM tasks WHERE status = 'done'))""",
    # no attempt (fencing token) ran twice, no run of an attempt that was never claimed
    "attempt_ran_twice": """
        SELECT count(*) FROM (SELECT 1 FROM public.chaos_runs GROUP BY task_id, attempt HAVING count(*) > 1) d""",
    "run_beyond_attempt": """
        SELECT count(*) FROM public.chaos_runs r JOIN tasks t ON t.id = r.task_id WHERE r.attempt > t.attempt""",
    # every extra attempt is explained by a rescue or a handler error, each logged on the task
    "unexplained_attempts": """
        WITH x AS (
            SELECT t.status, t.attempt, t.retry_count,
                   (SELECT count(*) FROM regexp_matches(t.progress_msg, 'lost; task rescued', 'g')) AS rescues,
                   (SELECT count(*) FROM regexp_matches(t.progress_msg, '\\[ERROR\\]', 'g')) AS errors
            FROM tasks t)
        SELECT count(*) FROM x WHERE CASE
            WHEN status = 'done' THEN attempt <> retry_count + 1 OR retry_count <> rescues + errors
            WHEN status = 'failed' THEN attempt <> retry_count OR retry_count <> rescues + errors
            ELSE attempt > rescues + errors + 1 END""",
    # only the type that always fails may fail; retries are ample for the others
    "unexpected_failures": "SELECT count(*) FROM tasks WHERE status = 'failed' AND type <> 'chaos_fail'",
    "fail_type_not_failed": "SELECT count(*) FROM tasks WHERE type = 'chaos_fail' AND status <> 'failed'",
}


def check(url: str, ids: list[int], killed: list[str], report: Report, *, faults_pending: bool = False) -> None:
    """The end-of-run SQL checks; fills `report.invariants`, `report.violations` and the figures."""
    with psycopg.connect(url, autocommit=True) as c:
        total = _q(c, "SELECT count(*) FROM tasks")
        present = _q(c, "SELECT count(*) FROM tasks WHERE id = ANY(%s)", ids)
        report.violations["lost_tasks"] = len(ids) - int(present)
        report.violations["unexpected_rows"] = int(total) - int(present)
        for name, sql in INVARIANTS.items():
            params = {"effect_types": list(EFFECT_TYPES)} if "%(" in sql else None
            row = c.execute(sql, params).fetchone()
            report.violations[name] = int(row[0]) if row else -1
        report.by_status = dict(c.execute("SELECT status, count(*) FROM tasks GROUP BY 1 ORDER BY 1").fetchall())
        rescued_by = c.execute(
            "SELECT m[1], count(*) FROM tasks, regexp_matches(progress_msg, 'worker (\\S+) lost; task rescued',"
            " 'g') AS m GROUP BY 1"
        ).fetchall()
        report.rescues = sum(n for _, n in rescued_by)
        report.rescues_of_killed = sum(n for w, n in rescued_by if w in set(killed))
        report.rescues_of_live = report.rescues - report.rescues_of_killed
        report.error_retries = int(
            _q(c, "SELECT count(*) FROM tasks, regexp_matches(progress_msg, '\\[ERROR\\]', 'g') AS m")
        )
        report.extra_attempts = int(_q(c, "SELECT coalesce(sum(attempt - 1), 0) FROM tasks WHERE attempt > 1"))
        report.runs = int(_q(c, "SELECT count(*) FROM public.chaos_runs"))
        report.effects = int(_q(c, "SELECT count(*) FROM public.chaos_effects"))
        finishes = sorted(
            r[0]
            for r in c.execute("SELECT extract(epoch FROM finished_at)::float8 FROM tasks WHERE status = 'done'")
        )
    report.recovery = [recovery(finishes, f) for f in report.faults]
    report.invariants = {
        "every task terminal": report.violations["non_terminal"] == 0,
        "no task lost": report.violations["lost_tasks"] == 0 and report.violations["unexpected_rows"] == 0,
        "exactly one effect per done task, none otherwise": report.violations["done_without_exactly_one_effect"]
        + report.violations["effect_of_other_attempt"]
        + report.violations["orphan_effects"]
        == 0,
        "no task done twice": report.violations["done_counter_mismatch"] == 0
        and report.violations["attempt_ran_twice"] == 0
        and report.violations["run_beyond_attempt"] == 0,
        "every extra attempt explained (rescue or logged error)": report.violations["unexplained_attempts"] == 0,
        "failures only where expected": report.violations["unexpected_failures"] == 0
        and report.violations["fail_type_not_failed"] == 0,
        "every killed worker's tasks rescued": report.kills == 0 or report.rescues_of_killed > 0,
        "no worker died on its own": report.unexpected_exits == 0 and report.worker_tracebacks == 0,
        "every fault injected under load": not faults_pending,
        "throughput back to 100% within 5 s": all(
            r["recovery_s"] is not None and r["recovery_s"] <= 5.0 for r in report.recovery
        ),
    }


def recovery(finishes: list[float], fault: Fault, before: float = 10.0, window: float = 1.0) -> dict[str, Any]:
    """Pre-fault rate (done tasks per second over the `before` seconds before the fault) and the time
    after PostgreSQL is back until a `window`-second span first completes at least that rate."""

    def count(a: float, b: float) -> int:
        return bisect.bisect_left(finishes, b) - bisect.bisect_left(finishes, a)

    rate = count(fault.started - before, fault.started) / before
    t, end = fault.back_up, (finishes[-1] if finishes else fault.back_up)
    rec: float | None = None
    while t + window <= end + 1e-9:
        if count(t, t + window) >= rate * window:
            rec = t - fault.back_up
            break
        t += 0.1
    timeline = [count(fault.started + s, fault.started + s + 1) for s in range(-5, 11)]
    return {
        "fault": fault.kind,
        "detail": fault.detail,
        "pre_fault_rate": round(rate, 1),
        "recovery_s": None if rec is None else round(rec, 1),
        "per_second_from_minus_5s": timeline,
    }


def render(report: Report) -> str:
    """The report as Markdown (what docs/reliability.md quotes)."""
    lines = [
        f"## chaos run `{report.profile}`: {'PASS' if report.ok else 'FAIL'}",
        "",
        f"- tasks: {report.tasks} ({', '.join(f'{k} {v}' for k, v in report.by_status.items())}); "
        f"{report.workers} worker processes; run took {report.duration_s:.1f}s",
        f"- pool through: {report.pgbouncer or 'direct connections'}; max backends of the database: "
        f"{report.max_backends}",
        f"- kills (SIGKILL): {report.kills}; workers that died on their own: {report.unexpected_exits}; "
             f"replacements that refused to start while the database was unreachable: {report.startup_refused}; "
        f"tracebacks in worker logs: {report.worker_tracebacks}",
        "- faults: "
        + "; ".join(f"{f.kind} ({f.detail})" for f in report.faults)
        + (f"; restart skipped: {report.restart_skipped}" if report.restart_skipped else ""),
        f"- rescues: {report.rescues} ({report.rescues_of_killed} of killed workers, {report.rescues_of_live} of "
        f"live workers whose lease ran out during a fault); handler errors retried: {report.error_retries}; "
        f"extra attempts: {report.extra_attempts}",
        f"- handler executions recorded: {report.runs}; effect rows: {report.effects}",
        f"- cancels: {report.cancels_requested}",
        f"- idle transaction held {report.idle_tx_held_s}s ({report.idle_tx_interruptions} interruptions); "
        f"max dead tuples in tasks: {report.max_dead_tuples}",
        f"- advisory locks left after the run: {report.leaked_advisory_locks}",
        "",
    ]
    lines.append("| fault | pre-fault rate (done/s) | back to 100% after | done per second from -5 s |")
    lines.append("|---|---|---|---|")
    for r in report.recovery:
        rec = "never" if r["recovery_s"] is None else f"{r['recovery_s']} s"
        lines.append(
            f"| {r['fault']} ({r['detail']}) | {r['pre_fault_rate']} | {rec} | "
            f"{' '.join(map(str, r['per_second_from_minus_5s']))} |"
        )
    lines += ["", "| invariant | holds | violations |", "|---|---|---|"]
    for k, v in report.invariants.items():
        lines.append(f"| {k} | {'yes' if v else '**NO**'} | |")
    bad = {k: v for k, v in report.violations.items() if v}
    lines.append("")
    lines.append(f"violating rows: {bad or 'none'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


@contextlib.contextmanager
def _database(server_url: str) -> Iterator[str]:
    from jobqueue.admin.migrate import migrate

    name = f"jobq_chaos_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(server_url, name)
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _external_restart(server_url: str, cmd: str, dbname: str) -> Callable[[], None]:
    """A restart of a shared server, done only if, at that moment, no other database has client
    sessions (other people's tests must not lose their server under them)."""

    def restart() -> None:
        with psycopg.connect(server_url, autocommit=True) as c:
            others = int(_q(c, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                               "AND pid <> pg_backend_pid() AND datname IS DISTINCT FROM %s", dbname))
        if others:
            raise RestartSkipped(f"{others} session(s) of other databases on the server")
        subprocess.run(shlex.split(cmd), check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(server_url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    return restart


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument(
        "--server",
        help="URL of a PostgreSQL server (its maintenance database) to run on; "
        "default: an embedded server in a temporary JOBQ_HOME",
    )
    ap.add_argument(
        "--restart-cmd",
        help="command that restarts --server (e.g. 'pg_ctlcluster "
        "--skip-systemctl-redirect 15 main restart'); without it no restart",
    )
    ap.add_argument("--no-pgbouncer", action="store_true", help="workers connect directly")
    ap.add_argument("--tasks", type=int, help="override the profile's task count")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, help="write the report as JSON here")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.tasks:
        profile = Profile(**{**asdict(profile), "tasks": args.tasks, "mix": profile.mix})
    os.environ.pop("JOBQ_DATABASE_URL", None)

    from jobqueue.admin import embedded

    home: Path | None = None
    if args.server:
        server_url = args.server
    else:
        home = Path(tempfile.mkdtemp(prefix="jobq-chaos-home-"))
        server_url = embedded.ensure_running(home).url("postgres")
    try:
        with _database(server_url) as url:
            restart: Callable[[], None] | None = None
            skipped: str | None = None
            if home is not None:

                def restart() -> None:
                    assert home is not None
                    embedded.stop(home, mode="fast")
                    embedded.ensure_running(home)
            elif args.restart_cmd:
                restart = _external_restart(server_url, args.restart_cmd, urlsplit(url).path.lstrip("/"))
            else:
                skipped = "no --restart-cmd for this server"
            report = run(
                url,
                profile,
                name=args.profile,
                restart=restart,
                restart_skipped=skipped,
                use_pgbouncer=False if args.no_pgbouncer else None,
                seed=args.seed,
            )
    finally:
        if home is not None:
            embedded.stop(home, mode="fast")
            shutil.rmtree(home, ignore_errors=True)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
