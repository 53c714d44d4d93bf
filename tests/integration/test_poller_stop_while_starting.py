"""SIGTERM reaches `poller run` while it is still starting: a requested stop, exit 0.

A rolling restart (`docker compose restart`, an orchestrator's update) may signal a replica
that is still importing, reading its settings, forking its sandbox process or connecting. It
must exit 0 with one `shutdown_requested` line (`phase: starting`), as docs/operations.md
("Signals and exit codes") says, not die of the signal (-15) for its supervisor to count as a
crash. The start-up is held at a chosen point with the `USM_TEST_HOLD_START` test hook
(poller/testhooks.py); the broker is a listener that accepts TCP and never answers the AMQP
handshake, or a port that refuses, so that the poller is connecting or in its backoff.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.poller_proc import PollerFactory, PollerProcess
from tests.support.procs import has_ended

pytestmark = pytest.mark.integration

#: Bound on how long the poller may take to reach a point in its start-up, on a loaded host.
REACH_TIMEOUT = 30.0
#: Bound on its exit after SIGTERM (the grace period is 30 s; nothing is in flight).
EXIT_TIMEOUT = 20.0


@pytest.fixture
def mute_broker() -> Iterator[str]:
    """An AMQP URL whose listener completes TCP handshakes and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # never accepted: the kernel answers the SYNs, nobody the AMQP
        yield f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}/"


@pytest.fixture
def refusing_broker() -> str:
    """An AMQP URL on a loopback port nobody listens on: every attempt is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"amqp://guest:guest@127.0.0.1:{port}/"


def _wait_for_event(poller: PollerProcess, event: str) -> None:
    deadline = time.monotonic() + REACH_TIMEOUT
    while not poller.events(event):
        if poller.proc.poll() is not None:
            raise AssertionError(
                f"poller exited with {poller.proc.returncode}:\n{poller.log_text()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} line after {REACH_TIMEOUT} s:\n{poller.log_text()}")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _assert_stopped_while_starting(poller: PollerProcess) -> None:
    code = poller.terminate(timeout=EXIT_TIMEOUT)
    assert code == 0, poller.log_text()
    # The replica's line: its lane process, when it had started, stopped too (no error line).
    [requested] = poller.replica_events("shutdown_requested")
    assert requested["phase"] == "starting"
    assert requested["signal"] == "SIGTERM"
    assert "Traceback" not in poller.log_text()
    assert not poller.events("<unparsed>"), poller.log_text()
    assert not _lines_at(poller, "error"), poller.log_text()


def _lines_at(poller: PollerProcess, level: str) -> list[dict[str, object]]:
    return [line for line in poller.log_lines() if line.get("level") == level]


def test_sigterm_before_the_imports_is_a_clean_stop(
    start_poller: PollerFactory, sid: str, refusing_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USM_TEST_HOLD_START", "imports")  # inherited by the poller
    poller = start_poller(sid, wait=False, amqp_dsn=refusing_broker)
    _wait_for_event(poller, "test_start_held")
    _assert_stopped_while_starting(poller)
    assert not poller.events("broker_connect_failed")  # it never tried


def test_sigterm_after_the_sandbox_fork_stops_the_sandbox_process_too(
    start_poller: PollerFactory, sid: str, refusing_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USM_TEST_HOLD_START", "sandbox")  # inherited by the poller
    poller = start_poller(sid, wait=False, amqp_dsn=refusing_broker)
    _wait_for_event(poller, "test_start_held")
    [sandbox] = _children(poller.pid)
    _assert_stopped_while_starting(poller)
    assert not poller.events("broker_connect_failed")
    assert has_ended(sandbox)  # reaped by the poller (or at least no longer running)


def test_sigterm_while_the_broker_does_not_answer_the_handshake_is_a_clean_stop(
    start_poller: PollerFactory, sid: str, mute_broker: str
) -> None:
    poller = start_poller(sid, wait=False, amqp_dsn=mute_broker)
    _wait_for_event(poller, "poller_started")  # the event loop is up, connecting
    _assert_stopped_while_starting(poller)
    # The attempt is given up, not reported as a failure (nor pika's half-open close noise).
    assert not _lines_at(poller, "warning"), poller.log_text()


def test_sigterm_in_the_reconnect_backoff_is_a_clean_stop(
    start_poller: PollerFactory, sid: str, refusing_broker: str
) -> None:
    poller = start_poller(sid, wait=False, amqp_dsn=refusing_broker)
    _wait_for_event(poller, "broker_connect_failed")  # now sleeping before the next attempt
    _assert_stopped_while_starting(poller)
