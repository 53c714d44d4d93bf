"""`poller check`: every answer names the health file it read, and how old it is."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poller.health import HealthState, check, health_path_from_env, write_state


def _write(path: Path, *, age: float = 0.0, pid: int | None = None, **flags: bool) -> None:
    state = HealthState(
        pid=os.getpid() if pid is None else pid,
        connected=flags.get("connected", True),
        consuming=flags.get("consuming", True),
        updated=time.time() - age,
    )
    write_state(path, state)


@pytest.mark.parametrize(
    ("age", "flags", "healthy", "says"),
    [
        (0.0, {}, True, "ok: connected and consuming"),
        (3.0, {"connected": False, "consuming": False}, False, "not connected to the broker"),
        (0.0, {"consuming": False}, False, "connected but not consuming"),
        (3600.0, {}, False, "is 60 min old: the poller is stuck or gone"),
    ],
)
def test_every_answer_names_the_file(
    tmp_path: Path, age: float, flags: dict[str, bool], healthy: bool, says: str
) -> None:
    path = tmp_path / "health.json"
    _write(path, age=age, **flags)
    ok, reason = check(path)
    assert ok is healthy
    assert says in reason
    assert str(path) in reason


def test_a_stale_or_missing_file_says_which_variables_point_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    _, missing = check(path)
    assert str(path) in missing
    assert "USM_POLLER_HEALTH_FILE" in missing
    _write(path, age=20)
    _, stale = check(path)
    assert "USM_POLLER_STATE_DIR" in stale
    assert "20 s old" in stale


def test_a_file_of_a_process_that_is_gone_says_so(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    # A pid far above pid_max is never a live process.
    _write(path, pid=2**31 - 2)
    ok, reason = check(path)
    assert not ok
    assert f"process {2**31 - 2} is gone (health file {path}, written just now)" in reason


def test_path_comes_from_the_variables_the_poller_uses() -> None:
    assert health_path_from_env({}) == Path("/tmp/usm-poller/health.json")
    assert health_path_from_env({"USM_POLLER_STATE_DIR": "/run/p1"}) == Path("/run/p1/health.json")
    assert health_path_from_env(
        {"USM_POLLER_STATE_DIR": "/run/p1", "USM_POLLER_HEALTH_FILE": "/x/h.json"}
    ) == Path("/x/h.json")


@pytest.mark.parametrize("variable", ["USM_POLLER_STATE_DIR", None])
def test_poller_check_prints_the_file_it_read(tmp_path: Path, variable: str | None) -> None:
    """The real command, from a shell without the poller's variables, or with its state dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_POLLER_", "US_AMQP"))}
    if variable is not None:
        env[variable] = str(tmp_path)
        path = tmp_path / "health.json"
        _write(path, age=3600)
    else:
        path = Path("/tmp/usm-poller/health.json")  # the default, whatever is there
    done = subprocess.run(
        [sys.executable, "-m", "poller", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = done.stdout + done.stderr
    assert str(path) in output
    if variable is not None:
        assert done.returncode == 1
        assert "60 min old" in done.stderr
