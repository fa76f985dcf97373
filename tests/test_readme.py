"""Every `jobq` command in the README's ```sh blocks runs as written (issue 13): each block in order, in a
fresh database, through bash (globs, quotes and comments as a user's shell reads them).

Not run, by design (the short list of exceptions):
- what is not a `jobq` command: the install lines (`python3 -m venv`, `pip install`) and `pytest`;
- `jobq worker` without `--burst` and `jobq ui` (a web server): they run until stopped;
- a command with `--wait` is run as written, beside a worker (it watches until a worker finishes it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, create_database, drop_database

README = REPO / "README.md"


def blocks() -> list[list[str]]:
    """The `jobq` commands of each ```sh block, in order (`.venv/bin/jobq` is `jobq` on the PATH)."""
    found: list[list[str]] = []
    for body in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
        commands = []
        for line in body.splitlines():
            for part in line.split("&&"):
                command = re.sub(r"^\S*/bin/jobq\b", "jobq", part.strip())
                if command.startswith("jobq ") and runnable(command):
                    commands.append(command)
        if commands:
            found.append(commands)
    return found


def runnable(command: str) -> bool:
    words = command.split("#")[0].split()
    return not ((words[1] == "worker" and "--burst" not in words) or words[1] == "ui")


def test_the_readme_shows_the_commands_this_test_runs() -> None:
    commands = [c for b in blocks() for c in b]
    assert any(c.startswith("jobq enqueue examples/samples/*") for c in commands)  # the quick start
    assert any("--type" in c and "--payload" in c for c in commands)
    assert not any("{...}" in c for c in commands)  # no placeholder a shell cannot run


@pytest.fixture
def shim(tmp_path: Path) -> Path:
    """A `jobq` on the PATH that is this checkout's, whatever the venv is called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "jobq"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m jobqueue "$@"\n')
    script.chmod(0o755)
    return bin_dir


@pytest.fixture
def fresh_url(server_url: str) -> Iterator[str]:
    from jobqueue.admin.migrate import migrate

    url = create_database(server_url, prefix="jobq_readme")
    migrate(url)
    try:
        yield url
    finally:
        drop_database(server_url, url)


@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_block_runs_as_written(index: int, shim: Path, fresh_url: str) -> None:
    env = {**os.environ, "JOBQ_DATABASE_URL": fresh_url, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
           "COLUMNS": "120"}
    for command in blocks()[index]:
        worker = None
        if "--wait" in command.split("#")[0]:
            worker = subprocess.Popen([sys.executable, "-m", "jobqueue", "worker", "--types", "dataflow,raptor"],
                                      env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            r = subprocess.run(["bash", "-c", command], env=env, cwd=REPO, capture_output=True, text=True,
                               timeout=300)
        finally:
            if worker is not None:
                worker.send_signal(signal.SIGTERM)
                worker.wait(60)
        assert r.returncode == 0, f"{command}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        if "#" in command and "task 1" in command.split("#", 1)[1]:
            assert r.stdout.strip() == "1"  # the id the README's next commands use
