"""Bad input, generated: the producer API and the CLI either do exactly what was asked (the task
round-trips through get()) or refuse with one clear error (a JobqError; on the CLI one line on stderr
and a non-zero exit, never a traceback) and write nothing.

Hypothesis profiles: ``jobq-ci`` (the default, a few hundred cases in all) and ``jobq-full`` (over
1,000 cases; JOBQ_TEST_PROFILE=full). Each property checks both branches, so a wrong acceptance
(a NaN stored, a priority truncated) fails as surely as a crash or a half-written row.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import handlers  # noqa: F401 - registers t_other, the type the CLI cases enqueue
import psycopg
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from support import FULL, REPO

from jobqueue import Client, JobqError, TaskSpec, task
from jobqueue.errors import UnknownTaskType

_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                              HealthCheck.data_too_large, HealthCheck.large_base_example],
}
settings.register_profile("jobq-ci", max_examples=60, **_COMMON)
settings.register_profile("jobq-full", max_examples=300, **_COMMON)
PROFILE = settings.get_profile("jobq-full" if FULL else "jobq-ci")


def examples(ci: int, full: int) -> settings:
    """The module's profile with a per-test case count (the full profile sums to well over 1,000)."""
    return settings(PROFILE, max_examples=full if FULL else ci)


class Page(BaseModel):
    doc: str
    page: int


@task("fz_plain")
async def fz_plain(ctx: Any, payload: Any) -> None:
    return None


@task("fz_typed", payload=Page)
async def fz_typed(ctx: Any, payload: Page) -> None:
    return None


# ---------------------------------------------------------------- strategies

TRICKY = [
    "", " ", "'", "''", "'; DROP TABLE tasks; --", "\" OR 1=1 --", "$1", "%s", "%(x)s", "{}", "[]", "null",
    "NULL", "\\", "\\\\", "\\u0000", "\\x00", "E'\\\\000'", "\x00", "a\x00b", "\ud800", "\udfff", "\u2028\u2029",
    "\ufeff", "e\u0301", "\U0010ffff", "\U0001f642", "ﬀ", "[bold]x[/]", "[/]", "\x1b[31mred", "\r\n", "\t",
    "x" * 1001, "é" * 600, "postgresql://u:pw@h/db",
]
ANY_CHAR = st.characters(codec=None, categories=["L", "M", "N", "P", "S", "Z", "C"])  # includes NUL, surrogates
SAFE_CHAR = st.characters(codec="utf-8", exclude_characters="\x00")

any_text = st.one_of(st.text(ANY_CHAR, max_size=40), st.sampled_from(TRICKY), st.text(max_size=20))


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


SAFE_TRICKY = [t for t in TRICKY if "\x00" not in t and not _has_surrogate(t)]
safe_text = st.one_of(st.text(SAFE_CHAR, max_size=40), st.sampled_from(SAFE_TRICKY))


def _nest(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _nest_tuples(depth: int) -> Any:
    """Tuples are JSON arrays to the encoder: as deep as lists may go, and no deeper (issue 11, item 21)."""
    value: Any = "leaf"
    for i in range(depth):
        value = (value,) if i % 2 else {"k": value}
    return value


def json_values(text: st.SearchStrategy[str], *, finite: bool) -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
                       st.floats(allow_nan=not finite, allow_infinity=not finite), text)
    return st.recursive(leaves, lambda ch: st.lists(ch, max_size=5) | st.lists(ch, max_size=5).map(tuple)
                        | st.dictionaries(text, ch, max_size=5), max_leaves=25)


any_payload = st.one_of(
    json_values(any_text, finite=False),
    st.integers(min_value=1, max_value=120).map(_nest),
    st.integers(min_value=1, max_value=120).map(_nest_tuples),
    st.sampled_from([_nest_tuples(50_000), ({1: "int key in a tuple"},)]),
    st.integers(min_value=0, max_value=2_500_000).map(lambda n: {"blob": "x" * n}),
    st.sampled_from([set(), b"bytes", object(), float("nan"), {1: "int key"}, {"t": (1, 2)}, [{"a": 1j}]]),
)
valid_payload = st.one_of(json_values(safe_text, finite=True), st.integers(min_value=1, max_value=60).map(_nest),
                          st.integers(min_value=0, max_value=200_000).map(lambda n: {"blob": "é" * n}))

offsets = st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59),
                                            max_value=timedelta(hours=23, minutes=59)))
run_ats = st.one_of(st.none(), st.datetimes(timezones=st.one_of(st.none(), st.just(UTC), offsets)),
                    st.sampled_from([datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, tzinfo=UTC),
                                     datetime(1970, 1, 1), datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
                                     datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))]),
                    st.sampled_from(["2030-01-01T00:00:00", 1_900_000_000]))  # wrong types: InvalidPayload
delays = st.one_of(st.none(), st.floats(), st.floats(min_value=-1e6, max_value=1e6),
                   st.sampled_from([1e300, -1e300, 1e15, float("inf"), float("nan"), "5", 10**400]))
ints = st.one_of(st.none(), st.integers(min_value=-1000, max_value=1000), st.integers(),
                 st.sampled_from([2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1]))


# ---------------------------------------------------------------- oracle helpers


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: numbers compare as numbers (jsonb keeps 1e16 as an integer), bools are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (math.isfinite(float(a)) and float(a) == float(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def rows(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT (SELECT count(*) FROM tasks) + (SELECT count(*) FROM documents)"
                       " + (SELECT count(*) FROM batches)").fetchone()
    assert row is not None
    return int(row[0])


def reset(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE tasks, documents, batches RESTART IDENTITY CASCADE")


def as_utc(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


# ---------------------------------------------------------------- producer API


@examples(ci=80, full=400)
@given(type_=st.one_of(st.sampled_from(["fz_plain", "fz_plain", "fz_typed"]), any_text), payload=any_payload,
       priority=ints, run_at=run_ats, delay=delays, max_retries=ints, dedupe_key=st.one_of(st.none(), any_text),
       owner=st.one_of(st.none(), any_text), digest=st.one_of(st.none(), any_text),
       labels=st.one_of(st.none(), st.lists(any_text, max_size=3)), doc_id=ints, from_page=ints)
def test_enqueue_succeeds_exactly_or_refuses_cleanly(
        client: Client, conn: psycopg.Connection[Any], type_: str, payload: Any, priority: int | None,
        run_at: datetime | None, delay: float | None, max_retries: int | None, dedupe_key: str | None,
        owner: str | None, digest: str | None, labels: list[str] | None, doc_id: int | None,
        from_page: int | None) -> None:
    reset(conn)
    kwargs: dict[str, Any] = dict(priority=priority, run_at=run_at, delay=delay, max_retries=max_retries,
                                  dedupe_key=dedupe_key, owner=owner, digest=digest, labels=labels, doc_id=doc_id,
                                  from_page=from_page)
    before = datetime.now(UTC)
    try:
        tid = client.enqueue(type_, payload, **kwargs)
    except JobqError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), f"unclear error: {exc!r}"
        assert rows(conn) == 0, f"{type(exc).__name__} but a row was written"
        return
    t = client.get(tid)
    assert rows(conn) == 1
    expected = payload if type_ != "fz_typed" else Page.model_validate(payload).model_dump(mode="json")
    assert json_equal(expected if expected is not None else {}, t.payload), (payload, t.payload)
    assert t.type == type_ and t.status == "queued"
    assert t.priority == (priority if priority is not None else 0)
    assert (t.owner, t.dedupe_key, t.digest, t.doc_id, t.from_page) == (owner, dedupe_key, digest, doc_id, from_page)
    assert t.labels == (labels or [])
    assert t.max_retries == (max_retries if max_retries is not None else 3)
    if run_at is not None:
        assert t.run_at == as_utc(run_at)
    elif delay is not None:
        assert abs((t.run_at - before).total_seconds() - delay) < 5
    # and it is exactly what a valid call would be: nothing a JobqError should have refused
    assert all(isinstance(x, str) and "\x00" not in x for x in (owner, dedupe_key, digest) if x is not None)


@examples(ci=40, full=200)
@given(payload=valid_payload, owner=st.one_of(st.none(), safe_text.filter(lambda s: len(s) <= 200)),
       priority=st.integers(min_value=-(2**31), max_value=2**31 - 1),
       run_at=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                           timezones=st.one_of(st.just(UTC), offsets)))
def test_valid_input_is_never_refused(client: Client, conn: psycopg.Connection[Any], payload: Any,
                                      owner: str | None, priority: int, run_at: datetime) -> None:
    """The other half of the contract: valid input (SQL-looking, escape-looking, odd unicode, far
    dates, extreme priorities) is stored exactly, not refused."""
    reset(conn)
    tid = client.enqueue("fz_plain", payload, owner=owner, priority=priority, run_at=run_at,
                         labels=[owner] if owner else None)
    t = client.get(tid)
    assert json_equal(payload if payload is not None else {}, t.payload)  # None means "no payload": {}
    assert (t.owner, t.priority, t.run_at) == (owner, priority, run_at)


@examples(ci=40, full=150)
@given(field=st.sampled_from(["owner", "dedupe_key", "digest", "labels", "type"]), value=any_text,
       priority=ints, run_at=run_ats)
@example(field="owner", value="x", priority=None, run_at=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))))
@example(field="owner", value="x", priority=None,
         run_at=datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5))))
@example(field="dedupe_key", value="\\u0000", priority=2**31 - 1, run_at=None)
def test_one_odd_field_at_a_time(client: Client, conn: psycopg.Connection[Any], field: str, value: str,
                                 priority: int | None, run_at: datetime | None) -> None:
    """One odd value among valid ones, so the success branch is reached as often as the refusal
    (in the test above most cases are refused for some other field first)."""
    reset(conn)
    kwargs: dict[str, Any] = {"priority": priority, "run_at": run_at}
    ttype = value if field == "type" else "fz_plain"
    if field == "labels":
        kwargs["labels"] = [value, "ok"]
    elif field != "type":
        kwargs[field] = value
    try:
        tid = client.enqueue(ttype, {"v": 1}, **kwargs)
    except JobqError as exc:
        assert str(exc) and rows(conn) == 0
        return
    t = client.get(tid)  # must be readable: a row get() cannot load would break `jobq ls` for everyone
    assert rows(conn) == 1 and t.payload == {"v": 1}
    assert t.priority == (priority or 0)
    if run_at is not None:
        assert t.run_at == as_utc(run_at)
    if field == "labels":
        assert t.labels == [value, "ok"]
    elif field != "type":
        assert getattr(t, field) == value


@examples(ci=20, full=120)
@given(items=st.lists(st.tuples(any_payload, st.one_of(st.none(), any_text), ints), min_size=1, max_size=6))
def test_enqueue_many_all_or_nothing(client: Client, conn: psycopg.Connection[Any],
                                     items: list[tuple[Any, str | None, int | None]]) -> None:
    reset(conn)
    specs = [TaskSpec(payload=p, dedupe_key=k, priority=pr) for p, k, pr in items]
    try:
        ids = client.enqueue_many("fz_plain", specs)
    except JobqError:
        assert rows(conn) == 0, "a refused batch wrote rows"
        return
    assert len(ids) == len(specs)
    first_of_key: dict[str, int] = {}
    for tid, s in zip(ids, specs, strict=True):
        if s.dedupe_key is not None and s.dedupe_key in first_of_key:
            assert tid == first_of_key[s.dedupe_key]  # a duplicate key in the batch returns the live task
            continue
        if s.dedupe_key is not None:
            first_of_key[s.dedupe_key] = tid
        t = client.get(tid)
        assert json_equal(s.payload if s.payload is not None else {}, t.payload)
        assert t.priority == (s.priority or 0) and t.dedupe_key == s.dedupe_key
    assert rows(conn) == len(set(ids))


@examples(ci=20, full=100)
@given(key=safe_text.filter(lambda s: len(s) <= 1000), first=valid_payload, second=valid_payload)
def test_duplicate_dedupe_key_returns_the_live_task(client: Client, conn: psycopg.Connection[Any], key: str,
                                                    first: Any, second: Any) -> None:
    reset(conn)
    a = client.enqueue("fz_plain", first, dedupe_key=key)
    assert client.enqueue("fz_plain", second, dedupe_key=key) == a
    assert rows(conn) == 1 and json_equal(first if first is not None else {}, client.get(a).payload)
    conn.execute("UPDATE tasks SET status = 'done' WHERE id = %s", (a,))
    b = client.enqueue("fz_plain", second, dedupe_key=key)  # a finished task frees its key
    assert b != a and json_equal(second if second is not None else {}, client.get(b).payload)


def test_unknown_type_writes_nothing(client: Client, conn: psycopg.Connection[Any]) -> None:
    reset(conn)
    with pytest.raises(UnknownTaskType):
        client.enqueue("no such type", {})
    assert rows(conn) == 0


# ---------------------------------------------------------------- the CLI


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`jobq ...` in-process (fast enough for hundreds of cases; NUL bytes can be passed, unlike in
    argv): exit code, stdout, stderr. An exception escaping main() is returned as a traceback."""
    from jobqueue.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: int | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:
            import traceback

            err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(exc)))
            code = 99
    return code or 0, out.getvalue(), err.getvalue()


def assert_clean_refusal(code: int, out: str, err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one error line, got {err!r}"
    assert lines[0].startswith("error:"), lines


@examples(ci=40, full=250)
@given(type_=st.one_of(st.just("t_other"), st.just("t_other"), any_text.filter(lambda s: "[" not in s)),
       payload=st.one_of(st.builds(lambda v: json.dumps(v, allow_nan=True), json_values(any_text, finite=False)),
                         any_text, st.sampled_from(["{", "NaN", "[1,", "1e999", '{"a":1,"a":2}', '"\\u0000"',
                                                    '"\\ud800"', "-0", "[" * 100 + "]" * 100])),
       priority=st.one_of(st.none(), st.integers(), st.integers(min_value=-100, max_value=100)),
       delay=st.one_of(st.none(), st.floats()), dedupe_key=st.one_of(st.none(), any_text),
       owner=st.one_of(st.none(), any_text))
def test_cli_enqueue_one_line_or_exact(db_url: str, client: Client, conn: psycopg.Connection[Any], type_: str,
                                       payload: str, priority: int | None, delay: float | None,
                                       dedupe_key: str | None, owner: str | None) -> None:
    reset(conn)
    argv = ["enqueue", f"--type={type_}", f"--payload={payload}"]
    if priority is not None:
        argv.append(f"--priority={priority}")
    if delay is not None:
        argv.append(f"--delay={delay!r}")
    if dedupe_key is not None:
        argv.append(f"--dedupe-key={dedupe_key}")
    if owner is not None:
        argv.append(f"--owner={owner}")
    code, out, err = run_cli(argv)
    if code != 0:
        assert_clean_refusal(code, out, err)
        assert rows(conn) == 0
        return
    assert not err.strip(), err
    t = client.get(int(out.strip()))
    sent = json.loads(payload)
    assert json_equal(sent if sent is not None else {}, t.payload)  # `null` means no payload, as in the API
    assert (t.type, t.priority, t.dedupe_key, t.owner) == (type_, priority or 0, dedupe_key, owner)


@examples(ci=4, full=25)
@given(payload=st.text(SAFE_CHAR, max_size=30), priority=st.integers())
def test_cli_subprocess_never_shows_a_traceback(db_url: str, conn: psycopg.Connection[Any], payload: str,
                                                priority: int) -> None:
    """The same contract through a real process (what a shell user sees)."""
    reset(conn)
    env = {**os.environ, "JOBQ_DATABASE_URL": db_url, "JOBQ_IMPORTS": "handlers",
           "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "jobqueue", "enqueue", "--type=t_other", f"--payload={payload}",
                        f"--priority={priority}"], capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    if p.returncode != 0:
        assert_clean_refusal(p.returncode, p.stdout, p.stderr)
        assert rows(conn) == 0
    else:
        assert rows(conn) == 1 and int(p.stdout.strip()) > 0


@examples(ci=15, full=100)
@given(data=st.one_of(st.binary(max_size=4096), st.sampled_from([b"", b"%PDF-1.7\n", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj",
                                                                 b"PK\x03\x04", b"\xff\xfe\x00\x00"])),
       suffix=st.sampled_from([".pdf", ".csv", ".txt", ".md", ".html", ".docx", ".xlsx", ".bin", ""]))
def test_cli_enqueue_file_of_random_bytes(db_url: str, conn: psycopg.Connection[Any], data: bytes,
                                          suffix: str) -> None:
    reset(conn)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"random{suffix}"
        path.write_bytes(data)
        code, out, err = run_cli(["enqueue", str(path)])
    assume(code != 0 or out)  # a document that was accepted prints what it queued
    if code != 0:
        assert "Traceback" not in err, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "error" in lines[0], err
        assert rows(conn) == 0, "a refused document wrote rows"
    else:
        assert rows(conn) > 0


@pytest.mark.parametrize("type_", ["[/]", "[bold]x[/]"])
def test_cli_error_text_is_not_rich_markup(db_url: str, type_: str) -> None:
    code, out, err = run_cli(["enqueue", f"--type={type_}", "--payload={}"])
    assert_clean_refusal(code, out, err)
    assert type_ in err


# ---------------------------------------------------------------- document files

SAMPLE_PDF = (REPO / "examples" / "samples" / "handbook.pdf").read_bytes()


def _doc_counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute("SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM tasks)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@examples(ci=40, full=300)
@given(
    data=st.one_of(
        st.binary(max_size=4096),
        st.binary(max_size=64).map(lambda b: b"%PDF-1.4\n" + b),  # a PDF header and then garbage
        st.integers(min_value=0, max_value=len(SAMPLE_PDF) - 1).map(lambda n: SAMPLE_PDF[:n]),  # truncated
        st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    suffix=st.sampled_from([".pdf", ".csv", ".md", ".txt", ".html", ".xlsx", ".docx", ".bin", ""]),
)
def test_document_files_of_any_bytes(db_url: str, tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                     suffix: str) -> None:
    """Any bytes under any name: the file is enqueued with a document and its tasks, or refused with a
    one-line error and nothing written for it; never an exception."""
    from jobq_workers.documents import enqueue_files

    path = tmp_path_factory.mktemp("fz-doc") / f"f{suffix}"
    path.write_bytes(data)
    with psycopg.connect(db_url, autocommit=True) as conn:
        before = _doc_counts(conn)
        result = enqueue_files([str(path)], force=True)
        after = _doc_counts(conn)
    (file,) = result.files
    if file.ok:
        assert file.doc_id is not None and after[0] >= before[0]
        assert file.tasks or file.reused or file.note
    else:
        assert file.error and "\n" not in file.error
        assert after == before  # nothing half-written for a refused file


def test_cli_document_errors_are_one_line_each(db_url: str, tmp_path: Any) -> None:
    """zero-byte, truncated and non-PDF-named-.pdf files in one call: one line each, exit 1, no traceback."""
    (tmp_path / "empty.pdf").write_bytes(b"")
    (tmp_path / "trunc.pdf").write_bytes(SAMPLE_PDF[: len(SAMPLE_PDF) // 3])
    (tmp_path / "fake.pdf").write_bytes(b"hello, not a pdf")
    r = subprocess.run([sys.executable, "-m", "jobqueue", "enqueue", *(str(tmp_path / n) for n in
                        ("empty.pdf", "trunc.pdf", "fake.pdf"))], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env={**os.environ, "JOBQ_DATABASE_URL": db_url})
    assert r.returncode != 0 and "Traceback" not in r.stderr + r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 3, r.stderr
