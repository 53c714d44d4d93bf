"""A process that serves a tiny app the way `satellite serve` does, and stops on SIGTERM.

`python -m tests.support.listen_app LISTEN SHUTDOWN_TIMEOUT` binds `LISTEN` (a
`USM_CORE_LISTEN` value), prints `ready` and the TCP ports, serves `/where` (the transport) and
`/slow` (prints `entered`, then answers `finished` after 2 s), and on SIGTERM or SIGINT stops
through `ApiServer.stop()`. Logs are JSON lines on stderr; a `ListenError` is one line there
and exit code 2.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from poller.errors import ConfigError
from poller.logging import configure_logging
from satellite.service.listen import ApiServer, bind_all, parse_listen, transport

SLOW_SECONDS = 2.0


async def where(request: Request) -> PlainTextResponse:
    return PlainTextResponse(transport(request.scope))


async def slow(request: Request) -> PlainTextResponse:
    print("entered", flush=True)
    await asyncio.sleep(SLOW_SECONDS)
    return PlainTextResponse("finished")


async def main(listen: str, shutdown_timeout: float) -> int:
    configure_logging("json", "info", sys.stderr)
    try:
        sockets = bind_all(parse_listen(listen))
    except ConfigError as exc:
        print(f"listen_app: {exc}", file=sys.stderr)
        return 2
    app = Starlette(routes=[Route("/where", where), Route("/slow", slow)])
    server = ApiServer(app, sockets, shutdown_timeout=shutdown_timeout)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.stop)
    ready = asyncio.Event()
    serving = asyncio.create_task(server.serve(ready))
    await ready.wait()
    ports = [str(s.getsockname()[1]) for s in sockets if s.family != socket.AF_UNIX]
    print("ready", *ports, flush=True)
    await serving
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], float(sys.argv[2]))))
