"""The demo's SSH device (compose.demo.yaml): answers `ssh.exec` commands like a small switch.

Listens on port 2222, accepts the login DEMO_SSH_USER / DEMO_SSH_PASSWORD (admin / admin), makes
a new host key at every start (the pollers trust it on first use) and answers a few `show`
commands; anything else gets an error and exit status 1. Runs in the poller image, which has
asyncssh.
"""

from __future__ import annotations

import asyncio
import os
import signal

import asyncssh

USER = os.environ.get("DEMO_SSH_USER", "admin")
PASSWORD = os.environ.get("DEMO_SSH_PASSWORD", "admin")
PORT = int(os.environ.get("DEMO_SSH_PORT", "2222"))
OUTPUTS = {
    "show version": (
        "Demo Switch Software, Version 1.0.0\n"
        "demo-switch-2 uptime is 3 weeks, 2 days\n"
        "24 x GigabitEthernet interfaces\n"
    ),
    "show clock": "10:00:00.000 UTC Mon Nov 23 2026\n",
    "show interfaces status": (
        "Port      Status       Vlan  Speed\n"
        "Gi0/1     connected    10    1000\n"
        "Gi0/2     notconnect   1     auto\n"
    ),
}


class DemoServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True  # always ask for a password

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == USER and password == PASSWORD


def handle(process: asyncssh.SSHServerProcess[str]) -> None:
    command = (process.command or "").strip()
    if command in OUTPUTS:
        process.stdout.write(OUTPUTS[command])
        process.exit(0)
    else:
        process.stderr.write(f"% Invalid input: {command!r}\n")
        process.exit(1)


async def main() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        DemoServer, "", PORT, server_host_keys=[key], process_factory=handle
    )
    print(f"demo SSH device on port {PORT}, host key {key.export_public_key().decode().strip()}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
