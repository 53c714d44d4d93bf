"""SIGTERM reaches `satellite serve` while it is still starting: a requested stop, exit 0.

A rolling update may signal a replica that is still importing or opening (and migrating) its
store. It must exit 0 with one `shutdown_requested` line (`phase: starting`) and no traceback,
not die of the signal (-15), and leave no API socket behind (docs/operations.md, "Signals and
exit codes"). Before the event loop, start-up is held with the `USM_TEST_HOLD_START` test hook
(poller/testhooks.py); with the loop up, the store is a PostgreSQL address whose listener
accepts TCP and never answers, so that opening it hangs.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.rabbitmq import AmqpVhost
from tests.support.serve_proc import ServeFactory, ServeProcess

pytestmark = pytest.mark.integration

#: Bound on how long the service may take to reach a point in its start-up, on a loaded host.
REACH_TIMEOUT = 30.0
#: Bound on its exit after SIGTERM.
EXIT_TIMEOUT = 20.0


@pytest.fixture
def start_serve(amqp_vhost: AmqpVhost, tmp_path: Path) -> Iterator[ServeFactory]:
    factory = ServeFactory(amqp_vhost, tmp_path)
    yield factory
    factory.kill_all()


@pytest.fixture
def mute_database() -> Iterator[str]:
    """A PostgreSQL URL whose listener completes TCP handshakes and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"postgresql://core:pw@127.0.0.1:{listener.getsockname()[1]}/history"


def _wait_until(serve: ServeProcess, reached: str) -> None:
    """Wait until the log has a line with event `reached`."""
    deadline = time.monotonic() + REACH_TIMEOUT
    while not [line for line in serve.log_lines() if line.get("event") == reached]:
        if serve.proc.poll() is not None:
            raise AssertionError(f"serve exited {serve.proc.returncode}:\n{serve.log_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {reached} line after {REACH_TIMEOUT} s:\n{serve.log_text()}")
        time.sleep(0.05)


def _assert_stopped_while_starting(serve: ServeProcess, step: str) -> None:
    assert serve.terminate(timeout=EXIT_TIMEOUT) == 0, serve.log_text()
    lines = serve.log_lines()
    requested = [line for line in lines if line.get("event") == "shutdown_requested"]
    assert [(r["phase"], r["signal"], r["step"]) for r in requested] == [
        ("starting", "SIGTERM", step)
    ], serve.log_text()
    assert "Traceback" not in serve.log_text()
    assert not [line for line in lines if line.get("level") == "error"], serve.log_text()
    assert not [line for line in lines if line.get("event") == "core_started"]
    assert not serve.socket_path.exists()


def test_sigterm_before_the_event_loop_is_a_clean_stop(start_serve: ServeFactory) -> None:
    serve = start_serve(wait=False, USM_TEST_HOLD_START="serve")
    _wait_until(serve, "test_start_held")
    _assert_stopped_while_starting(serve, "settings")


def test_sigterm_while_the_store_does_not_answer_is_a_clean_stop(
    start_serve: ServeFactory, mute_database: str
) -> None:
    serve = start_serve(wait=False, USM_CORE_DB=mute_database)
    # The event loop is up and the store is being opened once the process has a TCP
    # connection to the mute listener.
    port = int(mute_database.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    deadline = time.monotonic() + REACH_TIMEOUT
    while not _connected_to(serve.proc.pid, port):
        assert serve.proc.poll() is None, serve.log_text()
        assert time.monotonic() < deadline, serve.log_text()
        time.sleep(0.05)
    _assert_stopped_while_starting(serve, "store")


def _connected_to(pid: int, port: int) -> bool:
    """Whether process `pid` has a TCP socket connected to 127.0.0.1:`port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    wanted = f"0100007F:{port:04X}"
    for row in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[2] == wanted and fields[9] in inodes:
            return True
    return False
