"""Test-only fault hooks, for the fault-injection suite (tests/faults) only.

Never set them in a deployment, and they are not documented for operators. Read once, at
import; unset, each costs one falsy check. Not `USM_POLLER_*`: they are no setting (`poller
config show` and the unknown-setting check never see them); a test passes them in the poller's
environment, which the sandbox process (poller/sandbox.py) inherits.

- `USM_TEST_CRASH_AFTER_CONFIRM=P`: with probability P per job, the process exits (code
  `CRASH_EXIT`) after its result is confirmed and before the job is acked (poller/worker.py).
- `USM_TEST_CRASH_ON_JOB=ID[,ID...]`: the process that is about to run one of these jobs against
  its device exits (a poison job that kills whatever runs it: the poller itself, or the sandbox
  child that runs a suspect job; poller/runner.py and poller/sandbox.py).
- `USM_TEST_SERVE_CRASH_AFTER_CONFIRM=P`: in `satellite serve`, with probability P per batch of
  scheduled jobs, the process exits after the broker confirmed the batch and before its outbox
  rows are deleted: another replica takes them over once their lease expires
  (satellite/service/scheduler.py).
- `USM_TEST_HOLD_START=POINT`: start-up pauses at POINT (up to `HOLD_SECONDS`, less once a
  SIGTERM/SIGINT is recorded) after one `test_start_held` line on stderr, so that a test can
  signal a process that is still starting (poller/stopsignal.py). Points: `imports` (`poller
  run` before its heavy imports), `sandbox` (`poller run` after the sandbox fork, before the
  event loop), `serve` (`satellite serve` before it opens and migrates the store).
"""

from __future__ import annotations

import json
import os

from poller import stopsignal

__all__ = [
    "CRASH_AFTER_CONFIRM",
    "CRASH_EXIT",
    "CRASH_ON_JOB",
    "HOLD_START",
    "SERVE_CRASH_AFTER_CONFIRM",
    "crash",
    "crash_on_job",
    "hold_start",
]

CRASH_EXIT = 86


def _probability(name: str) -> float:
    raw = os.environ.get(name, "")
    try:
        return min(max(float(raw), 0.0), 1.0) if raw else 0.0
    except ValueError:
        return 0.0


CRASH_AFTER_CONFIRM = _probability("USM_TEST_CRASH_AFTER_CONFIRM")
SERVE_CRASH_AFTER_CONFIRM = _probability("USM_TEST_SERVE_CRASH_AFTER_CONFIRM")
CRASH_ON_JOB = frozenset(filter(None, os.environ.get("USM_TEST_CRASH_ON_JOB", "").split(",")))
HOLD_START = os.environ.get("USM_TEST_HOLD_START", "")
#: The longest a `USM_TEST_HOLD_START` hold lasts, in seconds.
HOLD_SECONDS = 10.0


def crash(hook: str, job_id: str) -> None:
    """Exit now, as a crash would: no cleanup, no ack; one line on stderr says where."""
    line = {"event": "test_crash", "hook": hook, "job_id": job_id, "level": "warning"}
    os.write(2, (json.dumps(line) + "\n").encode())
    os._exit(CRASH_EXIT)


def crash_on_job(job_id: str) -> None:
    """The `USM_TEST_CRASH_ON_JOB` hook: exit if `job_id` is one of its jobs."""
    if CRASH_ON_JOB and job_id in CRASH_ON_JOB:
        crash("crash_on_job", job_id)


def hold_start(point: str) -> None:
    """The `USM_TEST_HOLD_START` hook: pause start-up here if this is its point."""
    if point == HOLD_START:
        line = {"event": "test_start_held", "point": point, "level": "info"}
        os.write(2, (json.dumps(line) + "\n").encode())
        stopsignal.hold(HOLD_SECONDS)
