"""Fake UDP agents a test starts in its own event loop: `DatagramAgents().start(protocol)`
binds one on an ephemeral port (loopback by default) and returns the port; `close()` closes
every one it started (the fixtures that use it call it at teardown)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["DatagramAgents"]


class DatagramAgents:
    def __init__(self) -> None:
        self._transports: list[asyncio.BaseTransport] = []

    async def start(
        self, protocol: Callable[[], asyncio.DatagramProtocol], host: str = "127.0.0.1"
    ) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(protocol, local_addr=(host, 0))
        self._transports.append(transport)
        port: int = transport.get_extra_info("sockname")[1]
        return port

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
