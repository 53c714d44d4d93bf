"""tests/support/procs.py: a process that exited but is not reaped yet counts as ended; stopping
processes by PID, politely first."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.procs import has_ended, process_state, read_cmdline, stop_process


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


def test_stop_process_terminates_politely_and_reaps() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop_process(proc) == -15
    assert proc.returncode == -15


def test_stop_process_kills_a_process_that_ignores_sigterm() -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    assert stop_process(proc, grace=0.5) == -9
    assert time.monotonic() - started < 5
    proc.stdout.close()


def test_stop_process_only_reaps_one_that_has_exited() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    deadline = time.monotonic() + 10
    while not has_ended(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stop_process(proc) == 3
