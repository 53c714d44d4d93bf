"""ssh.exec through the broker and a real `poller run`: 200 commands to one device, few logins."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import fake_devices
from tests.support.fake_devices import FakeSshDevice
from tests.support.poller_proc import JobClient, PollerFactory, data
from tests.support.rabbitmq import AmqpVhost

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 2


class DeviceThread:
    """A fake SSH device on its own event loop in a thread (the test itself is synchronous)."""

    def __init__(self) -> None:
        self.device: FakeSshDevice | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.device = FakeSshDevice(fake_devices.PROFILES["cisco_ios"])
        self._loop.run_until_complete(self.device.start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.device.close())
        self._loop.close()

    def __enter__(self) -> FakeSshDevice:
        self._thread.start()
        assert self._ready.wait(10), "fake device did not start"
        assert self.device is not None
        return self.device

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture
def device() -> Iterator[FakeSshDevice]:
    with DeviceThread() as dev:
        yield dev


def exec_job(port: int, job_id: str) -> dict[str, Any]:
    return {
        "v": 1,
        "id": job_id,
        "kind": "ssh.exec",
        "target": {"host": "127.0.0.1", "port": port},
        "auth": {"username": fake_devices.USERNAME, "password": fake_devices.PASSWORD},
        "params": {"commands": ["show version"]},
        "timeout": 30,
    }


def test_200_commands_through_the_broker_use_at_most_the_configured_connections(
    start_poller: PollerFactory, amqp_vhost: AmqpVhost, device: FakeSshDevice
) -> None:
    sid = f"ssh-{uuid.uuid4().hex[:8]}"
    poller = start_poller(sid, ssh_max_connections=MAX_CONNECTIONS, concurrency=32)
    client = JobClient(amqp_vhost.dsn, sid)
    try:
        ids = [f"ssh-{n}" for n in range(200)]
        for job_id in ids:
            client.publish(exec_job(device.port, job_id))
        results = {r.result.job_id: r.result for r in client.collect_ids(ids, timeout=120)}
    finally:
        client.close()
        poller.terminate()
    assert set(results) == set(ids), poller.log_text()[-3000:]
    assert all(r.status == "ok" for r in results.values()), [
        r.error for r in results.values() if r.error
    ][:3]
    assert all(data(r)["results"][0]["exit_status"] == 0 for r in results.values())
    assert 1 <= device.stats.connections <= MAX_CONNECTIONS
    assert len(device.stats.commands) == 200
    assert fake_devices.PASSWORD not in poller.log_text()
