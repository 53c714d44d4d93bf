"""Net-SNMP's `snmpbulkwalk` and `snmpwalk` programs as child processes, for fast walks.

ezsnmp runs a whole Net-SNMP program in-process for every page of a walk (argument parsing and a
session opened and closed per GETBULK of 25 varbinds); the programs themselves walk a subtree in
one session, an order of magnitude faster. The Net-SNMP backend therefore hands the rest of a
long walk to one of them (`snmp_netsnmp.NetsnmpBackend`); this module only runs the program and
reads what it prints. It knows nothing of credentials but the `snmp.conf` text it is given:

- Credentials never appear on the command line (`/proc/<pid>/cmdline` is world-readable). They
  are written to `snmp.conf` (mode 0600) in a private directory (0700), which the child finds
  through `SNMPCONFPATH` in its own environment, and which is removed when the walk ends,
  however it ends.
- The child's environment is that directory and nothing else (`SNMPCONFPATH`,
  `SNMP_PERSISTENT_DIR`, `MIBDIRS`, `MIBS=`): no system `snmp.conf`, no MIB, no state kept
  between walks, and none of the poller's own variables (its broker URL) in the child.
- The child is killed (SIGKILL) as soon as the caller stops reading it: the end of the subtree,
  `max_varbinds`, the output cap, an error, or cancellation at the job's deadline.

Output is numeric OIDs, hex OCTET STRINGs and numeric enums (`-On -Ox -Oe`): the same printed
forms ezsnmp returns, so the backend decodes both with the same code. Every varbind starts a line
with `.`; a long Hex-STRING goes on over the following lines.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Self

__all__ = ["PrintedVarbinds", "Row", "WalkChild", "WalkPrograms", "WalkStalledError", "walk_argv"]

#: One printed varbind: (OID, Net-SNMP's type label, printed value), as ezsnmp reports it.
Row = tuple[str, str, str]

#: Bytes of output read (and decoded) per step; the event loop gets a turn after each.
CHUNK_BYTES = 16 * 1024
#: Most of the child's error output kept (it prints a line or two).
_MAX_STDERR = 64 * 1024

# Values Net-SNMP prints without a type label, as the type names ezsnmp reports for them.
_UNTYPED = {
    "No Such Object available on this agent at this OID": "NOSUCHOBJECT",
    "No Such Instance currently exists at this OID": "NOSUCHINSTANCE",
}
#: What `snmpwalk` prints when an SNMPv1 agent answers noSuchName (the end of its MIB view).
_END_OF_MIB = "End of MIB"


class WalkStalledError(Exception):
    """The program printed nothing for longer than its requests can take (see `WalkChild`)."""


@dataclass(frozen=True, slots=True)
class WalkPrograms:
    """Where Net-SNMP's walk programs are (None: not installed; the backend walks page by page)."""

    bulk: str | None
    next: str | None

    @classmethod
    def find(cls) -> WalkPrograms:
        """Look both up on PATH (once, when the backend is made)."""
        return cls(shutil.which("snmpbulkwalk"), shutil.which("snmpwalk"))


def walk_argv(
    program: str,
    *,
    bulk: bool,
    peer: str,
    root: str,
    timeout: float,
    retries: int,
    max_repetitions: int,
) -> list[str]:
    """The command line of one walk: options, agent and subtree, and never a credential.

    `snmpbulkwalk` gets `-Cr` (max-repetitions); `snmpwalk` (GETNEXT, SNMPv1) gets `-CI`, so that
    an empty subtree is not followed by a GET of its root.
    """
    args = [program, "-On", "-Ox", "-Oe", "-t", f"{timeout:g}", "-r", str(retries)]
    args.append(f"-Cr{max_repetitions}" if bulk else "-CI")
    return [*args, peer, "." + root]


class PrintedVarbinds:
    """Splits what a walk program prints (in chunks of any size) into `Row`s."""

    def __init__(self) -> None:
        self._partial = ""  # the start of a line whose end has not come yet
        self._lines: list[str] | None = None  # the varbind being read (it may go on)

    def feed(self, data: bytes) -> list[Row]:
        """The varbinds that `data` completes; the last one waits for the next line."""
        text = self._partial + data.decode("latin-1")  # ASCII in practice; never fails
        complete, newline, self._partial = text.rpartition("\n")
        if not newline:
            return []
        rows: list[Row] = []
        for line in complete.split("\n"):
            if line.startswith("."):
                if self._lines is not None:
                    rows.append(_row(self._lines))
                self._lines = [line]
            elif line and line != _END_OF_MIB and self._lines is not None:
                self._lines.append(line)  # a Hex-STRING going on
        return rows

    def close(self) -> list[Row]:
        """The varbinds still held back, at the end of the output."""
        rows = self.feed(b"\n") if self._partial else []
        if self._lines is not None:
            rows.append(_row(self._lines))
            self._lines = None
        return rows


def _row(lines: list[str]) -> Row:
    oid, _, printed = lines[0].partition(" = ")
    if len(lines) > 1:
        printed = "\n".join([printed, *lines[1:]])
    kind, colon, value = printed.partition(": ")
    if colon:
        return oid, kind, value  # "Hex-STRING: 74 65", "Opaque: Float: 0.5", "OID: .1.3"
    if printed in ('""', "NULL"):
        return oid, printed, ""
    kind = _UNTYPED.get(printed, printed)  # endOfMibView stays as text, as ezsnmp gives it
    return oid, kind, printed


def _private_conf(conf: str, parent: str | None = None) -> str:
    """A new 0700 directory (in `parent`, else the temporary directory) holding `snmp.conf`
    (0600) with `conf`; its path."""
    directory = tempfile.mkdtemp(prefix="usm-walk-", dir=parent)  # 0700, a fresh name, O_EXCL
    try:
        path = os.path.join(directory, "snmp.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(conf)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


class WalkChild:
    """One running walk program: its printed varbinds in batches, then how it ended.

    Use as an async context manager; leaving it kills the child if it still runs and removes its
    configuration directory. The small local file operations run on the loop (tens of
    microseconds); the child itself never blocks it.

    `stall`: seconds without output after which `rows()` raises `WalkStalledError`. A program
    that neither prints nor ends within the time its requests can take is going round in
    circles (`snmpbulkwalk` asks the same page again forever when an agent answers a GETBULK
    with no varbinds and no error).
    """

    def __init__(self, proc: asyncio.subprocess.Process, directory: str, stall: float) -> None:
        self.proc = proc
        self.directory = directory
        self.stall = stall
        self._printed = PrintedVarbinds()
        self._eof = False

    @classmethod
    async def start(
        cls, argv: list[str], conf: str, *, stall: float, parent: str | None = None
    ) -> WalkChild:
        """Start `argv` with `conf` as its only configuration, in a new directory in `parent`
        (the backend's private directory, so that nothing outlives a killed poller; default:
        the temporary directory). Raises OSError if it cannot."""
        directory = _private_conf(conf, parent)
        env = {
            "SNMPCONFPATH": directory,
            "SNMP_PERSISTENT_DIR": directory,
            "MIBDIRS": directory,
            "MIBS": "",
            "HOME": directory,
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(proc, directory, stall)

    async def rows(self) -> list[Row] | None:
        """The next printed varbinds (at least one), or None when the output has ended."""
        stdout = self.proc.stdout
        assert stdout is not None
        while not self._eof:
            try:
                async with asyncio.timeout(self.stall):
                    chunk = await stdout.read(CHUNK_BYTES)
            except TimeoutError:
                raise WalkStalledError(f"no output for {self.stall:g} s") from None
            if not chunk:
                self._eof = True
                rows = self._printed.close()
            else:
                rows = self._printed.feed(chunk)
                # A buffered read does not yield: let the loop run between chunks.
                await asyncio.sleep(0)
            if rows:
                return rows
        return None

    async def finish(self) -> tuple[int, str]:
        """After the output has ended: the exit status and what the child said on stderr."""
        stderr = self.proc.stderr
        assert stderr is not None
        said = bytearray()
        while chunk := await stderr.read(_MAX_STDERR):  # to the end: it may come in pieces
            said += chunk[: max(0, _MAX_STDERR - len(said))]
        code = await self.proc.wait()
        return code, said.decode("utf-8", "replace")

    async def aclose(self) -> None:
        """Kill the child if it still runs, remove its directory, and reap it."""
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):  # it has just ended on its own
                self.proc.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
        # Read both pipes to their end so that the transport closes (the child is gone).
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                await stream.read()
        await self.proc.wait()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
