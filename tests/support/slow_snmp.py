"""Slow SNMP devices for load tests: every request is answered after a fixed delay.

One thread serves UDP sockets on several loopback addresses (a device is its host address).
The answer to a request is the request itself with its PDU tag turned into GetResponse: every
varbind comes back with the value it was asked with (`Null` for a GET), the request id and
community echoed. That is a valid SNMPv1/v2c response, and cheap enough that one thread answers
thousands of requests per second, so the delay is what a poller sees.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import threading
import time
from types import TracebackType
from typing import Self

GET_RESPONSE = 0xA2


def _length(data: bytes, at: int) -> tuple[int, int]:
    """A BER length at `at`: (length, offset of the content)."""
    first = data[at]
    if first < 0x80:
        return first, at + 1
    n = first & 0x7F
    return int.from_bytes(data[at + 1 : at + 1 + n], "big"), at + 1 + n


def response_to(request: bytes) -> bytes | None:
    """The GetResponse for a v1/v2c request (None when it is not one)."""
    if len(request) < 2 or request[0] != 0x30:
        return None
    try:
        _, at = _length(request, 1)
        for expected in (0x02, 0x04):  # version INTEGER, community OCTET STRING
            if request[at] != expected:
                return None
            size, content = _length(request, at + 1)
            at = content + size
        if not 0xA0 <= request[at] <= 0xA5:
            return None
    except IndexError:
        return None
    return request[:at] + bytes([GET_RESPONSE]) + request[at + 1 :]


class SlowSnmpAgents:
    """`with SlowSnmpAgents(hosts, delay=0.05) as agents:` devices at `agents.port` on `hosts`."""

    def __init__(self, hosts: list[str], *, delay: float, max_seconds: float = 300.0) -> None:
        self.hosts = hosts
        self.delay = delay
        self.max_seconds = max_seconds
        self.answered = 0
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        first.bind((self.hosts[0], 0))
        self.port = first.getsockname()[1]
        self._sockets.append(first)
        for host in self.hosts[1:]:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host, self.port))
            self._sockets.append(sock)
        for sock in self._sockets:
            sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="slow-snmp", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in self._sockets:
            sock.close()

    def _run(self) -> None:
        due: list[tuple[float, int, socket.socket, bytes, tuple[str, int]]] = []
        order = itertools.count()
        with selectors.DefaultSelector() as selector:
            for sock in self._sockets:
                selector.register(sock, selectors.EVENT_READ)
            end = time.monotonic() + self.max_seconds
            while not self._stop.is_set() and time.monotonic() < end:
                now = time.monotonic()
                while due and due[0][0] <= now:
                    _, _, sock, answer, peer = heapq.heappop(due)
                    try:
                        sock.sendto(answer, peer)
                        self.answered += 1
                    except OSError:
                        pass
                wait = 0.1 if not due else max(0.0, min(0.1, due[0][0] - now))
                for key, _ in selector.select(wait):
                    server = key.fileobj
                    assert isinstance(server, socket.socket)
                    for _ in range(64):
                        try:
                            request, client = server.recvfrom(65_535)
                        except BlockingIOError:
                            break
                        response = response_to(request)
                        if response is not None:
                            at = time.monotonic() + self.delay
                            heapq.heappush(due, (at, next(order), server, response, client))
