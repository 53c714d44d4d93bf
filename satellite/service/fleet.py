"""Fleet status for the API: heartbeats kept up to date in the background, queues on request.

`FleetWatch` runs the `satellite` toolkit's heartbeat listener (kombu) in a thread of its own
for the life of the replica, so that `GET /v1/satellites` answers from heartbeats already
received instead of listening for seconds per request; it reconnects with capped backoff. The
queue statistics come from the RabbitMQ management API per request, and `satellite_status()`
(the code behind `satellite status --json`) puts them together.

One management API client (`management_api()`: an httpx client, its TLS context and its kept-alive
connection) serves the replica from its first use to `stop()`: the fleet page, the alert rules'
pass and `/v1/satellites` all ask for the same figures, and building a client per pass cost
more CPU than the requests did. httpx clients can be shared between threads.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from poller import __version__, wire
from poller.logging import get_logger
from poller.wire import Heartbeat
from satellite.client import Client
from satellite.config import CoreSettings as BrokerSettings
from satellite.management import ManagementApi, ManagementError, ManagementSettings
from satellite.status import FleetView, ReplicaView, SatelliteStatus, satellite_status

__all__ = ["FleetError", "FleetWatch", "LockedFleet"]

log = get_logger("satellite.service.fleet")

#: A replica whose last heartbeat is older than this is not counted (6 x the default interval).
HEARTBEAT_MAX_AGE = 60.0
#: Seconds between two looks for the events exchange while it does not exist (no poller and
#: no `satellite declare` yet): no heartbeat can arrive before it does.
EXCHANGE_RETRY_SECONDS = 5.0
REQUEST_TIMEOUT = 30.0


class FleetError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class LockedFleet(FleetView):
    """A `FleetView` written by the listener thread and read by the event loop."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def add(self, beat: Heartbeat, received_at: float | None = None) -> None:
        with self._lock:
            super().add(beat, received_at)

    def replicas(self, satellite_id: str, *, max_age: float | None = None) -> list[ReplicaView]:
        with self._lock:
            return super().replicas(satellite_id, max_age=max_age)

    def satellites(self) -> list[str]:
        with self._lock:
            return super().satellites()


class FleetWatch:
    """Heartbeats into a `LockedFleet` from a background thread; status on request."""

    def __init__(self, broker: BrokerSettings, management: ManagementSettings) -> None:
        self.broker = broker
        self.management = management
        self.fleet = LockedFleet()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="fleet-heartbeats", daemon=True)
        self.connected = False
        self._api: ManagementApi | None = None
        self._api_lock = threading.Lock()  # guards `_api`, not its use (httpx: thread-safe)
        self._api_closed = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the heartbeat listener and close the management API client."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._api_lock:
            self._api_closed = True
            api, self._api = self._api, None
        if api is not None:
            api.close()

    @contextmanager
    def management_api(self) -> Iterator[ManagementApi]:
        """The replica's management API client, built on first use and kept until `stop()`
        (blocking: call it from a thread). `ManagementError` once stopped."""
        with self._api_lock:
            if self._api_closed:
                raise ManagementError("the service is stopping")
            if self._api is None:
                self._api = ManagementApi(self.management)
            api = self._api
        yield api

    def _listen(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                missing = self._listen_once()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any broker error
                self.connected = False
                attempt += 1
                delay = random.uniform(0.5, min(30.0, 2.0**attempt))  # noqa: S311 - jitter
                log.warning(
                    "heartbeats_lost",
                    error=f"{type(exc).__name__}: {self.broker.scrub(str(exc))}"[:300],
                    retry_in_s=round(delay, 2),
                )
                self._stop.wait(delay)
                continue
            attempt = 0
            if missing:  # bind again once a poller or `satellite declare` has made it
                self._stop.wait(EXCHANGE_RETRY_SECONDS)
        self.connected = False

    def _listen_once(self) -> bool:
        """Take heartbeats until `stop()`; True at once when the events exchange is missing
        (the listener cannot bind: its `listen()` returns at once, and looping on it would
        spin this thread, holding the GIL the event loop needs)."""
        with Client(self.broker) as client:
            listener = client.heartbeat_listener(self.fleet)
            self.connected = True
            try:
                while listener.missing is None and not self._stop.is_set():
                    listener.listen(1.0)
            finally:
                listener.close()
        return listener.missing is not None

    async def status(self, satellite_id: str | None = None) -> list[SatelliteStatus]:
        """Every known satellite's status (or one's; `FleetError` 404 when unknown)."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                statuses = await asyncio.to_thread(self._collect, satellite_id)
        except TimeoutError:
            raise FleetError(503, "management_unavailable", "no answer in time") from None
        except ManagementError as exc:
            raise FleetError(503, "management_unavailable", str(exc)) from None
        if satellite_id is not None and not statuses:
            raise FleetError(
                404, "unknown_satellite", f"no queue and no heartbeat for {satellite_id!r}"
            )
        return statuses

    def _collect(self, only: str | None) -> list[SatelliteStatus]:
        with self.management_api() as api:
            queues: dict[str, dict[str, Any]] = {str(q.get("name")): q for q in api.queues()}
            ids = {sid for name in queues if (sid := wire.satellite_of_jobs_queue(name))}
            ids |= set(self.fleet.satellites())
            if only is not None:
                ids &= {only}
            out = []
            for sid in sorted(ids):
                name = wire.jobs_queue(sid)
                queue = api.queue(name) if name in queues else None
                out.append(
                    satellite_status(
                        sid,
                        queue=queue,
                        dlq=queues.get(wire.dead_letter_queue(sid)),
                        lane=queues.get(wire.interactive_queue(sid)),
                        fleet=self.fleet,
                        core_version=__version__,
                        heartbeat_max_age=HEARTBEAT_MAX_AGE,
                    )
                )
            return out
