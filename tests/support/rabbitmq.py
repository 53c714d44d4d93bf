"""RabbitMQ for tests: a fresh vhost per test session, and `rabbitmqctl` helpers to inspect it.

The broker is the one running on 127.0.0.1:5672 (guest/guest; override with
`TEST_RABBITMQ_HOST`, `TEST_RABBITMQ_PORT`, `TEST_RABBITMQ_USER`, `TEST_RABBITMQ_PASSWORD`),
administered with `rabbitmqctl`. When it is missing the tests that need it are skipped with the
reason, or fail when `CI` is set.

```python
def test_something(amqp_vhost: AmqpVhost) -> None:
    conn = kombu.Connection(amqp_vhost.dsn)
    queues = list_queues(amqp_vhost.name)
```
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest

__all__ = [
    "AmqpVhost",
    "amqp_vhost",
    "list_bindings",
    "list_exchanges",
    "list_queues",
    "queue_arguments",
    "rabbitmq_unavailable_reason",
    "rabbitmqctl",
    "remove_stale_vhosts",
    "satellite_queues_cleaned",
]

RABBITMQCTL_TIMEOUT = 60.0
_VHOST_RE = re.compile(r"^test-(\d+)-[0-9a-f]{8}$")


@dataclass(frozen=True, slots=True)
class AmqpVhost:
    """A vhost that exists for the whole test session; `dsn` connects to it as the test user."""

    name: str
    host: str
    port: int
    username: str
    password: str

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.username, self.password)

    def dsn_for(self, username: str, password: str) -> str:
        """A DSN for this vhost as another broker user."""
        user = quote(username, safe="")
        secret = quote(password, safe="")
        return f"amqp://{user}:{secret}@{self.host}:{self.port}/{quote(self.name, safe='')}"


def _settings() -> tuple[str, int, str, str]:
    return (
        os.environ.get("TEST_RABBITMQ_HOST", "127.0.0.1"),
        int(os.environ.get("TEST_RABBITMQ_PORT", "5672")),
        os.environ.get("TEST_RABBITMQ_USER", "guest"),
        os.environ.get("TEST_RABBITMQ_PASSWORD", "guest"),
    )


#: Debian's wrapper runs `su rabbitmq -s /bin/sh`; variables that the test process picked up
#: (Net-SNMP's, once the netsnmp backend has run in it) have made that `su` ignore `-s` and run
#: the account's nologin shell. rabbitmqctl needs none of them.
_CTL_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


def rabbitmqctl(*args: str, timeout: float = RABBITMQCTL_TIMEOUT) -> str:
    """Run `rabbitmqctl ARGS` and return its stdout; raise `RuntimeError` on failure."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl is not on PATH")
    try:
        done = subprocess.run(
            [exe, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=_CTL_ENV,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} took more than {timeout} s") from None
    if done.returncode != 0:
        raise RuntimeError(
            f"rabbitmqctl {' '.join(args)} exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[:500]}"
        )
    return done.stdout


def _list(what: str, vhost: str, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    out = rabbitmqctl(what, "-p", vhost, *columns, "--formatter", "json", "--quiet")
    rows: list[dict[str, Any]] = json.loads(out or "[]")
    return rows


def list_queues(vhost: str, *columns: str) -> list[dict[str, Any]]:
    """Queues of `vhost` with these columns (default: name, type, durable, arguments, messages)."""
    return _list(
        "list_queues", vhost, columns or ("name", "type", "durable", "arguments", "messages")
    )


def list_exchanges(vhost: str, *columns: str) -> list[dict[str, Any]]:
    return _list("list_exchanges", vhost, columns or ("name", "type", "durable"))


def list_bindings(vhost: str) -> list[tuple[str, str, str]]:
    """(source exchange, destination queue, routing key) of every non-default binding."""
    rows = _list(
        "list_bindings",
        vhost,
        ("source_name", "destination_name", "destination_kind", "routing_key"),
    )
    return [
        (row["source_name"], row["destination_name"], row["routing_key"])
        for row in rows
        if row["source_name"] and row["destination_kind"] == "queue"
    ]


def consumer_connections(vhost: str) -> dict[str, set[str]]:
    """{queue name: the connections of its consumers} in `vhost`, as broker pids in the form
    `rabbitmqctl close_connection` takes (its JSON output has another form)."""

    def rows(*args: str) -> list[list[str]]:
        out = rabbitmqctl(*args, "-p", vhost, "--quiet", "--no-table-headers")
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    channels = dict(rows("list_channels", "pid", "connection"))
    found: dict[str, set[str]] = {}
    for queue, channel in rows("list_consumers", "queue_name", "channel_pid"):
        found.setdefault(queue, set()).add(channels.get(channel, "?"))
    return found


def queue_arguments(vhost: str) -> dict[str, dict[str, Any]]:
    """{queue name: {argument: value}} as the broker holds them."""
    return {
        row["name"]: {name: value for name, _type, value in row["arguments"]}
        for row in list_queues(vhost, "name", "arguments")
    }


def rabbitmq_unavailable_reason() -> str | None:
    """Why the broker cannot be used for tests, or None when it can."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not on PATH"
    host, port, _, _ = _settings()
    try:
        with socket.create_connection((host, port), timeout=3):
            pass
    except OSError as exc:
        return f"no RabbitMQ listening on {host}:{port} ({exc})"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_vhosts() -> list[str]:
    """Delete test vhosts left by test runs whose process is gone (killed before teardown)."""
    removed = []
    for row in json.loads(rabbitmqctl("list_vhosts", "name", "--formatter", "json", "-q") or "[]"):
        match = _VHOST_RE.match(row["name"])
        if match and not _pid_alive(int(match.group(1))):
            rabbitmqctl("delete_vhost", row["name"])
            removed.append(row["name"])
    return removed


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[AmqpVhost]:
    """A fresh vhost for this test session, with full permissions for the test user."""
    reason = rabbitmq_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ is required in CI: {reason}")
        pytest.skip(f"RabbitMQ is not available: {reason}")
    host, port, username, password = _settings()
    remove_stale_vhosts()
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, username, ".*", ".*", ".*")
        yield AmqpVhost(name=name, host=host, port=port, username=username, password=password)
    finally:
        rabbitmqctl("delete_vhost", name)


#: Satellite queues a test made are deleted after it (`satellite_queues_cleaned`): every
#: satellite has three quorum queues now (jobs, lane, DLQ), and RabbitMQ 3.10 keeps file handles
#: for each quorum queue; a whole session's worth (~400) exhausted the broker's handle limit
#: (927 with `ulimit -n 1024`), after which new AMQP connections timed out in the handshake.
SATELLITE_QUEUE_PREFIX = "usm_poller-sat-"


def _management(vhost: AmqpVhost) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://{vhost.host}:15672/api",
        auth=(vhost.username, vhost.password),
        timeout=10.0,
    )


def satellite_queue_names(vhost: AmqpVhost) -> set[str]:
    """The satellite queues of the vhost, by the management API (empty when it cannot say)."""
    try:
        with _management(vhost) as api:
            answer = api.get(f"/queues/{quote(vhost.name, safe='')}", params={"columns": "name"})
            answer.raise_for_status()
            return {
                q["name"] for q in answer.json() if q["name"].startswith(SATELLITE_QUEUE_PREFIX)
            }
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return set()


def delete_queues(vhost: AmqpVhost, names: set[str]) -> None:
    """Delete these queues (best effort: a queue already gone or an API hiccup is no failure)."""
    if not names:
        return
    with contextlib.suppress(httpx.HTTPError), _management(vhost) as api:
        vh = quote(vhost.name, safe="")
        for name in sorted(names):
            with contextlib.suppress(httpx.HTTPError):
                api.delete(f"/queues/{vh}/{quote(name, safe='')}")


def purge_queue(vhost: AmqpVhost, name: str) -> None:
    """Drop the ready messages of a queue (best effort, like `delete_queues`)."""
    with contextlib.suppress(httpx.HTTPError), _management(vhost) as api:
        api.delete(f"/queues/{quote(vhost.name, safe='')}/{quote(name, safe='')}/contents")


#: The results queue every satellite of the session vhost publishes to. What a test leaves
#: there is purged after it: a reader that filters by satellite holds the others' results
#: (up to `satellite.results.MAX_HELD`), and a session's leftovers (over 10,000) kept the
#: results of a later test out of its reader's reach.
RESULTS_QUEUE = "usm_poller.results"


@pytest.fixture(autouse=True)
def satellite_queues_cleaned(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that uses the session vhost, delete the satellite queues it created and
    purge the shared results queue."""
    if "amqp_vhost" not in request.fixturenames:
        yield
        return
    vhost: AmqpVhost = request.getfixturevalue("amqp_vhost")
    before = satellite_queue_names(vhost)
    yield
    delete_queues(vhost, satellite_queue_names(vhost) - before)
    purge_queue(vhost, RESULTS_QUEUE)
