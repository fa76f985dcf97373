"""Hygiene: a connection URL's password never reaches a log line, a progress message, a stored error
or the CLI's error line; the payload ceiling holds in the database whatever writes the row; and the
layers keep their imports (typer and rich only in the CLI, whose base imports no command module).

Each test first makes sure the text it inspects is really there (the warning was logged, the error
was stored, the URL shape survived with ***), so none of them can pass by inspecting nothing.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import FULL, REPO, BackgroundWorker, wait_for

from jobqueue import Client, Context, Fail, task
from jobqueue.db.connect import redact_text
from jobqueue.runtime.listener import Listener
from jobqueue.settings import get_settings

SECRET = "hunter2-Sekr3t"
LEAKY_URL = f"postgresql://app:{SECRET}@db.internal.example:5432/prod"


@task("hy_raise", max_retries=0)
async def hy_raise(ctx: Context, payload: Any) -> None:
    raise ConnectionError(f"could not reach {LEAKY_URL} (timeout)")


@task("hy_fail", max_retries=3)
async def hy_fail(ctx: Context, payload: Any) -> None:
    raise Fail(f"bad config: JOBQ_DATABASE_URL={LEAKY_URL}")


@task("hy_retry", max_retries=1, backoff_base=0.05, backoff_max=0.1)
async def hy_retry(ctx: Context, payload: Any) -> None:
    raise RuntimeError(f"first try against postgres://app:{SECRET}@10.0.0.1/x failed")


@task("hy_progress")
async def hy_progress(ctx: Context, payload: Any) -> None:
    ctx.progress(0.5, f"connecting to {LEAKY_URL}")
    await asyncio.sleep(0.4)  # let the progress writer flush it while the task runs
    ctx.progress(0.9, f"still at {LEAKY_URL}")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when we return: connections are refused


def _all_text(records: list[logging.LogRecord]) -> str:
    return "\n".join(r.getMessage() + (r.exc_text or "") for r in records)


# ---------------------------------------------------------------- logs


def test_worker_with_unreachable_password_url_logs_no_password(db_url: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The worker retries an unreachable database, logging each failure: none may carry the password."""
    from jobqueue.runtime.worker import Worker

    url = f"postgresql://app:{SECRET}@127.0.0.1:{_closed_port()}/nowhere"
    caplog.set_level(logging.DEBUG)

    async def go() -> None:
        w = Worker(["hy_raise"], url=url)
        task_ = asyncio.create_task(w.run())
        await asyncio.sleep(1.5)
        task_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task_

    asyncio.run(go())
    warnings = [r for r in caplog.records if "database unreachable" in r.getMessage()]
    assert warnings, "the worker should have logged its failed connection attempts"
    assert SECRET not in _all_text(caplog.records)


def test_listener_with_password_url_logs_no_password(caplog: pytest.LogCaptureFixture) -> None:
    """JOBQ_LISTEN_URL may differ from the pool's URL; its failures are logged redacted too."""
    caplog.set_level(logging.DEBUG)
    url = f"postgresql://app:{SECRET}@127.0.0.1:{_closed_port()}/nowhere"

    async def go() -> None:
        listener = Listener(url, ["jobq.x"], lambda c, p: None, lambda: None)
        t = asyncio.create_task(listener.run())
        await asyncio.sleep(0.8)
        await listener.stop()
        await asyncio.wait_for(t, 5)

    asyncio.run(go())
    assert any("database unreachable (LISTEN connection" in r.getMessage() for r in caplog.records)
    assert SECRET not in _all_text(caplog.records)


def test_worker_listen_url_setting_is_used(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """JOBQ_LISTEN_URL sends LISTEN to its own URL (PgBouncer in transaction mode cannot LISTEN)."""
    from jobqueue.runtime.worker import Worker

    bad = f"postgresql://app:{SECRET}@127.0.0.1:{_closed_port()}/nowhere"
    monkeypatch.setenv("JOBQ_LISTEN_URL", bad)
    get_settings.cache_clear()
    try:
        w = Worker(["hy_raise"])
        assert w.listener.url == bad and w.url == db_url
    finally:
        monkeypatch.delenv("JOBQ_LISTEN_URL")
        get_settings.cache_clear()
    assert Worker(["hy_raise"]).listener.url == db_url


def test_cli_worker_with_password_url_fails_in_one_redacted_line() -> None:
    url = f"postgresql://app:{SECRET}@127.0.0.1:{_closed_port()}/nowhere"
    env = {**os.environ, "JOBQ_DATABASE_URL": url}
    for args in (["worker", "--types", "dataflow"], ["ls"], ["enqueue", "--type", "dataflow", "--payload", "{}"]):
        p = subprocess.run([sys.executable, "-m", "jobqueue", *args], capture_output=True, text=True, env=env,
                           timeout=60, cwd=REPO)
        assert p.returncode != 0, args
        assert SECRET not in p.stderr + p.stdout, args
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert "app:***@127.0.0.1" in lines[0], lines  # the URL is shown, its password is not


# ---------------------------------------------------------------- stored errors and progress


@pytest.mark.parametrize("ttype", ["hy_raise", "hy_fail", "hy_retry"])
def test_handler_error_with_password_url_is_redacted(client: Client, ttype: str) -> None:
    tid = client.enqueue(ttype, {})
    with BackgroundWorker([ttype], poll_seconds=0.2):
        wait_for(lambda: client.get(tid).status == "failed", timeout=15)
    t = client.get(tid)
    assert t.last_error and "***@" in t.last_error, t.last_error
    assert "[ERROR]" in t.progress_msg and "***@" in t.progress_msg
    assert SECRET not in t.last_error and SECRET not in t.progress_msg
    assert SECRET not in json.dumps(t.result)


def test_progress_message_with_password_url_is_redacted(client: Client) -> None:
    tid = client.enqueue("hy_progress", {})
    seen: list[str] = []
    with BackgroundWorker(["hy_progress"], poll_seconds=0.2):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            t = client.get(tid)
            seen.append(t.progress_msg)  # what a dashboard polling the row sees, mid-run too
            if t.status == "done":
                break
            time.sleep(0.05)
    t = client.get(tid)
    assert t.status == "done" and "connecting to postgresql://app:***@" in t.progress_msg
    assert all(SECRET not in m for m in seen)


@settings(max_examples=500 if FULL else 100, deadline=None, database=None)
@given(password=st.text(st.sampled_from("abcXYZ019-._~!$&'()*+,;=:%"), min_size=6, max_size=30),
       user=st.text(st.sampled_from("abcxyz019-._"), max_size=10),
       scheme=st.sampled_from(["postgresql", "postgres", "postgresql+psycopg", "postgresql+asyncpg"]),
       before=st.text(max_size=30), after=st.sampled_from(["", "/db", ":5432/db?sslmode=require", " (timeout)"]))
def test_redact_text_removes_any_password(password: str, user: str, scheme: str, before: str, after: str) -> None:
    password = "Q" + password + "Q"  # a marker that cannot be mistaken for the surrounding text
    text = f"{before} {scheme}://{user}:{password}@db.example{after}"
    red = redact_text(text)
    assert password not in red
    assert f"{scheme}://{user}:***@db.example{after}" in red


# ---------------------------------------------------------------- payload ceiling in the database


def test_payload_ceiling_holds_for_every_plain_sql_path(conn: psycopg.Connection[Any]) -> None:
    """The CHECK on tasks refuses an oversized payload whatever writes it: INSERT, UPDATE, COPY."""
    big = json.dumps({"blob": "y" * 2_200_000})
    ok = conn.execute("INSERT INTO tasks (type, payload) VALUES ('hy_raise', '{}') RETURNING id").fetchone()
    assert ok is not None
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO tasks (type, payload) VALUES ('hy_raise', %s::jsonb)", (big,))
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE tasks SET payload = %s::jsonb WHERE id = %s", (big, ok[0]))
    with pytest.raises(psycopg.errors.CheckViolation), conn.cursor() as cur, \
            cur.copy("COPY tasks (type, payload) FROM STDIN") as copy:
        copy.write_row(("hy_raise", big))
    row = conn.execute("SELECT count(*) FROM tasks WHERE octet_length(payload::text) > 2097152").fetchone()
    assert row == (0,)


def test_payload_ceiling_holds_for_an_already_compressed_value(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS big_src (j jsonb)")
    conn.execute("TRUNCATE big_src")
    conn.execute("INSERT INTO big_src SELECT jsonb_build_object('blob', repeat('z', 3000000))")
    try:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO tasks (type, payload) SELECT 'hy_raise', j FROM big_src")
    finally:
        conn.execute("DELETE FROM tasks WHERE type = 'hy_raise' AND octet_length(payload::text) > 2097152")


def test_python_limit_is_tighter_than_the_database(client: Client, conn: psycopg.Connection[Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from jobqueue import InvalidPayload

    monkeypatch.setenv("JOBQ_MAX_PAYLOAD_BYTES", "1000")
    get_settings.cache_clear()
    try:
        small = Client(client.url)
        with pytest.raises(InvalidPayload, match="over the limit of 1000"):
            small.enqueue("hy_raise", {"s": "x" * 1000})
        assert small.get(small.enqueue("hy_raise", {"s": "x" * 900})).payload == {"s": "x" * 900}
        small.close()
    finally:
        monkeypatch.delenv("JOBQ_MAX_PAYLOAD_BYTES")
        get_settings.cache_clear()


# ---------------------------------------------------------------- layering


def _imported(path: Any) -> set[str]:
    """Every module a file imports, at any depth of its code (lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_typer_and_rich_live_only_in_the_cli() -> None:
    library = [p for p in (REPO / "jobqueue").rglob("*.py") if "cli" not in p.relative_to(REPO / "jobqueue").parts]
    assert len(library) > 20
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imported(p) if m.split(".")[0] in ("typer", "rich"))
                 for p in library}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_cli_base_imports_no_command_module_and_every_module_registers_one_way() -> None:
    cli = REPO / "jobqueue" / "cli"
    commands = {p.stem for p in cli.glob("*.py")} - {"__init__", "app", "top"}
    assert {"tasks", "worker", "db", "observe"} <= commands
    assert not {m for m in _imported(cli / "app.py") if m.startswith("jobqueue.cli.")}
    for name in commands:
        tree = ast.parse((cli / f"{name}.py").read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == "register" for n in tree.body), name
    from jobqueue.cli import COMMANDS

    assert set(COMMANDS) == commands


def test_each_command_word_is_listed_with_the_module_that_registers_it() -> None:
    """cli/__init__.py imports only the module owning argv's command: its table must match what each
    module's register() really adds, or `jobq <that command>` would be an unknown command."""
    from typer.main import get_command_name

    from jobqueue.cli import COMMANDS, app, command_word, module_of, register

    register(["--help"])
    added: dict[str, list[str]] = {}
    for c in app.registered_commands:
        added.setdefault(module_of(c), []).append(c.name or get_command_name(c.callback.__name__))
    for g in app.registered_groups:
        added.setdefault(module_of(g), []).append(g.name)
    assert added == {name: list(words) for name, words in COMMANDS.items()}
    assert command_word(["--database-url", "ls", "-v", "status", "1"]) == "status"
    assert command_word(["--verbose", "--", "ls"]) == "ls"
    assert command_word(["--help"]) is None
