"""A local HTTP receiver for notification tests: records each request, answers from a script.

A small asyncio server on 127.0.0.1 (HTTP/1.1, one request per connection), standing in for a
webhook endpoint or Telegram's bot API. `answers` is the list of `(status, json body)` to give,
in order; the last one repeats. With `hold`, each answer waits until that event is set (a
channel slow to answer).

```python
async with Receiver([(500, {}), (200, {"ok": True})]) as hook:
    ... POST to hook.url ...
    assert len(hook.requests) == 2
```
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Received", "Receiver", "ThreadedReceiver"]


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    """time.monotonic() when it arrived."""

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    def __init__(
        self, answers: list[tuple[int, Any]] | None = None, *, hold: asyncio.Event | None = None
    ) -> None:
        self.answers = list(answers or [(200, {"ok": True})])
        self.hold = hold
        self.requests: list[Received] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Received(method, path, headers, body, time.monotonic()))
                n = len(self.requests) - 1
                status, answer = self.answers[min(n, len(self.answers) - 1)]
                if self.hold is not None:
                    await self.hold.wait()
                data = json.dumps(answer).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


class ThreadedReceiver:
    """A `Receiver` on an event loop of its own thread, for tests that are not async."""

    def __init__(self, answers: list[tuple[int, Any]] | None = None) -> None:
        self.receiver = Receiver(answers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.receiver.url

    @property
    def requests(self) -> list[Received]:
        return list(self.receiver.requests)

    def __enter__(self) -> ThreadedReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.__aenter__(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.__aexit__(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
