"""A TCP forwarder that listens inside a network namespace and connects out from the machine's.

    python -m tests.support.nsforward --netns NAME --listen 192.0.2.2:5672 --connect 127.0.0.1:5672

The listening socket is made inside namespace NAME (the calling thread enters it with setns(2),
makes the socket and comes back before anything else runs); every upstream connection is made
from the namespace the process started in. A poller inside a test's namespace reaches the
machine's broker on 127.0.0.1 this way without any address, route or interface being added to
the machine's own namespace (and the broker sees a loopback peer: `guest` may log in).

When either side of a forwarded connection closes or fails, both are closed at once, as a
direct connection would be: a broker that drops a connection for missed heartbeats is seen by
the poller, and a poller that gives up its connection is seen by the broker. Prints `ready` on
stdout once listening; SIGTERM ends it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
#: An upstream connect that takes longer than this fails the downstream connection.
CONNECT_TIMEOUT = 10.0


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the block's socket creation in namespace `netns` (this thread only; needs root).

    Sockets made inside stay in that namespace after the block."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def listening_socket(netns: str, host: str, port: int) -> socket.socket:
    with inside(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def _serve(sock: socket.socket, upstream: tuple[str, int]) -> None:
    async def handle(down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                up_r, up_w = await asyncio.open_connection(*upstream)
        except (OSError, TimeoutError):
            down_w.transport.abort()
            return
        tasks = [
            asyncio.create_task(_pipe(down_r, up_w)),
            asyncio.create_task(_pipe(up_r, down_w)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        # Abort, not close: close() would wait for unsent data that may never leave.
        up_w.transport.abort()
        down_w.transport.abort()

    server = await asyncio.start_server(handle, sock=sock)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()  # until SIGTERM (its default action: exit at once)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--netns", required=True)
    parser.add_argument("--listen", required=True, help="HOST:PORT inside --netns")
    parser.add_argument("--connect", required=True, help="HOST:PORT from the starting namespace")
    args = parser.parse_args()
    lhost, lport = args.listen.rsplit(":", 1)
    chost, cport = args.connect.rsplit(":", 1)
    sock = listening_socket(args.netns, lhost, int(lport))
    asyncio.run(_serve(sock, (chost, int(cport))))


if __name__ == "__main__":
    main()
