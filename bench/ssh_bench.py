"""SSH benchmark: commands/s and client CPU per command, reused connection vs a new one each time.

    .venv/bin/python bench/ssh_bench.py                 # both targets, writes docs/performance.md
    .venv/bin/python bench/ssh_bench.py --no-write --seconds 3

Runs `ssh.exec` jobs of one command through `SshExecDriver`, side by side in one run:

- reused: the driver's pool (one login, a new channel per command);
- new connection: the same driver with `ssh_idle_timeout=0`, so every job logs in again;

each sequentially (one job at a time) and with 8 jobs in flight, against two targets:

- OpenSSH sshd on loopback (key login; the server forks a shell per command, which dominates);
- the asyncssh fake device of the tests, in its own process (password login, no fork).

Client CPU is this process's CPU time (`time.process_time`) divided by the commands run; the
servers run in other processes. Each cell stops after `--commands` commands or `--seconds`
seconds, whichever comes first. Needs root (sshd) and network to 127.0.0.1 only. The table goes
into docs/performance.md under `## SSH` (only that section is replaced).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import DOC, write_section  # noqa: E402

from poller.drivers.base import JobContext  # noqa: E402
from poller.drivers.ssh import SshExecDriver, SshHostKeys  # noqa: E402
from poller.wire import CliAuth, SshExecJob  # noqa: E402
from tests.support import fake_devices  # noqa: E402
from tests.support.sshd import free_port, start_sshd  # noqa: E402

HEADING = "## SSH"


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    auth: CliAuth
    command: str


@dataclass(frozen=True)
class Cell:
    target: str
    mode: str
    in_flight: int
    commands: int
    seconds: float
    cpu: float
    connections: int

    @property
    def rate(self) -> float:
        return self.commands / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.commands


async def measure(
    target: Target, *, reuse: bool, in_flight: int, limit: int, seconds: float, state: Path
) -> Cell:
    host_keys = SshHostKeys(known_hosts_file=None, tofu_path=state / "tofu")
    pooled = SshExecDriver(host_keys, sessions_per_device=max(4, in_flight))
    job = SshExecJob(
        v=1,
        id="bench",
        kind="ssh.exec",
        target={"host": "127.0.0.1", "port": target.port},
        auth=target.auth,
        params={"commands": [target.command]},
    )
    loop = asyncio.get_running_loop()
    logins = 0

    async def one() -> None:
        nonlocal logins
        # Reused: the shared pool. New: a driver of its own, closed after the job.
        driver = pooled if reuse else SshExecDriver(host_keys)
        try:
            data = await driver.run(job, target.auth, JobContext(loop.time() + 30, 1 << 20))
        finally:
            if not reuse:
                await driver.aclose()
        connection = data["connection"]
        logins += isinstance(connection, dict) and not connection["reused"]

    await one()  # warm up: TOFU entry, imports, the pool's login
    logins = 0
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while done < limit and time.monotonic() < stop:
            done += 1
            await one()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await pooled.aclose()
    mode = "reused connection" if reuse else "new connection per command"
    return Cell(target.name, mode, in_flight, done, elapsed, cpu, logins)


@contextlib.contextmanager
def fake_device_process() -> Iterator[int]:
    """The asyncssh fake device in a child process (so its CPU is not the client's)."""
    port = free_port()
    code = (
        "import asyncio, sys\n"
        "from tests.support.fake_devices import fake_ssh_device\n"
        "async def main():\n"
        f"    async with fake_ssh_device('cisco_ios', port={port}):\n"
        "        print('ready', flush=True)\n"
        "        await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("fake device did not start")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def run_all(targets: list[Target], limit: int, seconds: float) -> list[Cell]:
    cells = []
    with tempfile.TemporaryDirectory(prefix="ssh-bench-") as state:
        for target in targets:
            for in_flight in (1, 8):
                for reuse in (True, False):
                    cell = await measure(
                        target,
                        reuse=reuse,
                        in_flight=in_flight,
                        limit=limit,
                        seconds=seconds,
                        state=Path(state),
                    )
                    print(
                        f"{cell.target:<28} {cell.mode:<27} in flight {in_flight}: "
                        f"{cell.rate:8.1f} commands/s, {cell.cpu_ms:6.2f} ms CPU/command, "
                        f"{cell.connections} logins",
                        flush=True,
                    )
                    cells.append(cell)
    return cells


def table(cells: list[Cell], args: argparse.Namespace) -> str:
    lines = [
        HEADING,
        "",
        f"`bench/ssh_bench.py` on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}: `ssh.exec` jobs of one "
        "command through `SshExecDriver`, each cell stopped after "
        f"{args.commands} commands or {args.seconds:g} s. CPU is the client process's only "
        "(the servers run in other processes). Logins are those made during the cell (the "
        "reused cells log in once, during a warm-up job before the clock starts).",
        "",
        "| target | connection | jobs in flight | commands/s | client CPU per command | logins |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {c.target} | {c.mode} | {c.in_flight} | {c.rate:.1f} | {c.cpu_ms:.2f} ms | "
        f"{c.connections} |"
        for c in cells
    ]
    by = {(c.target, c.mode, c.in_flight): c for c in cells}
    notes = []
    for c in cells:
        if c.mode.startswith("reused"):
            new = by.get((c.target, "new connection per command", c.in_flight))
            if new:
                notes.append(
                    f"- {c.target}, {c.in_flight} in flight: reuse gives "
                    f"{c.rate / new.rate:.1f}x the commands/s at "
                    f"{new.cpu_ms / c.cpu_ms:.1f}x less client CPU per command."
                )
    notes.append(
        "- OpenSSH runs every command through a new shell process (about 0.1 s each on this "
        "machine kind), so its commands/s measure the server; the client CPU column and the "
        "fake device's rows show what the poller itself spends."
    )
    return "\n".join([*lines, "", *notes, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=500, help="commands per cell at most")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per cell at most")
    parser.add_argument("--no-write", action="store_true", help="do not touch the docs")
    args = parser.parse_args()
    fake_auth = CliAuth(username=fake_devices.USERNAME, password=SecretStr(fake_devices.PASSWORD))
    with start_sshd() as sshd, fake_device_process() as fake_port:
        sshd_auth = CliAuth(username=sshd.user, private_key=SecretStr(sshd.client_key))
        targets = [
            Target("OpenSSH sshd (`true`)", sshd.port, sshd_auth, "true"),
            Target("asyncssh fake device", fake_port, fake_auth, "show empty"),
        ]
        cells = asyncio.run(run_all(targets, args.commands, args.seconds))
    section = table(cells, args)
    print()
    print(section)
    if not args.no_write:
        write_section(HEADING, section)
        print(f"written to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
