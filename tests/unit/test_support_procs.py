"""tests/support/procs.py: a process that exited but is not reaped yet counts as ended."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.procs import has_ended, process_state, read_cmdline


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "two words"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _until_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while process_state(pid) != "Z":
        assert time.monotonic() < deadline, f"{pid} did not become a zombie"
        time.sleep(0.01)


def test_a_running_process_shows_its_arguments(sleeper: subprocess.Popen[bytes]) -> None:
    assert read_cmdline(sleeper.pid) == [
        sys.executable,
        "-c",
        "import time; time.sleep(30)",
        "two words",
    ]
    assert process_state(sleeper.pid) in ("S", "R")
    assert not has_ended(sleeper.pid)


def test_an_exited_child_not_yet_reaped_has_ended(sleeper: subprocess.Popen[bytes]) -> None:
    sleeper.kill()  # and not waited for: a zombie until the fixture reaps it
    _until_zombie(sleeper.pid)
    assert has_ended(sleeper.pid)
    assert read_cmdline(sleeper.pid) is None


def test_a_reaped_child_has_ended(sleeper: subprocess.Popen[bytes]) -> None:
    sleeper.kill()
    sleeper.wait(10)
    assert process_state(sleeper.pid) is None
    assert has_ended(sleeper.pid)
    assert read_cmdline(sleeper.pid) is None
