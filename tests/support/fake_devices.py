"""Fake network devices for the CLI drivers: asyncssh and telnetlib3 servers on loopback.

`CliEmulator` is a transport-independent model of a vendor CLI, fed the characters the client
types and answering with actions (text to send, pauses, a stall, a disconnect). `PROFILES` holds
one per platform of `platforms.yaml`, written from the vendors' documented behaviour, not from
our platform data, so the tests check the data against an independent model: banners, login
prompts, prompts, `enable` with a secret (wrong secrets answered as the vendor does), paging
commands, pagers with their own erase sequences, error messages.

`Behaviour` adds the awkward parts: pagers that cannot be disabled, slow output, output that
stalls, a disconnect in the middle of a page, logins asked again inside an SSH channel.

Every server counts connections and authentication attempts (`DeviceStats`), listens on
127.0.0.1 only, and is closed by the fixture that started it.

Commands every fake knows (output from `expected_output`): `show version` (2 pages),
`show long` (5 pages), `show running-config` (privileged only), `show big` (~1 MB),
`show slow` (with pauses), `show stall` (stops after a few lines), `show drop` (disconnects at
the first pager), `show empty`; anything else gets the platform's error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import asyncssh
import telnetlib3

__all__ = [
    "PROFILES",
    "Behaviour",
    "CliEmulator",
    "DeviceStats",
    "FakeSshDevice",
    "FakeTelnetDevice",
    "Profile",
    "SilentServer",
    "expected_output",
    "fake_ssh_device",
    "fake_telnet_device",
    "silent_server",
]

HOST = "127.0.0.1"
USERNAME = "admin"
PASSWORD = "s3cret-login-pw"
ENABLE_SECRET = "s3cret-enable-pw"
PAGE = 24


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Stall:
    """Send nothing more, ever (until the client goes away)."""


@dataclass(frozen=True)
class Close:
    """End the session."""


Action = str | Sleep | Stall | Close


def _bs_erase(text: str) -> str:
    return "\b" * len(text) + " " * len(text) + "\b" * len(text)


def _ansi_erase(text: str) -> str:
    return f"\x1b[{len(text)}D" + " " * len(text) + f"\x1b[{len(text)}D"


def _cr_erase(text: str) -> str:
    return "\r" + " " * len(text) + "\r"


def _cr_clear(_: str) -> str:
    return "\r\x1b[K"


@dataclass(frozen=True)
class Profile:
    """How one vendor's CLI looks and behaves."""

    platform: str
    prompt: str
    privileged_prompt: str | None = None
    banner: str = ""
    username_prompt: str = "Username: "
    password_prompt: str = "Password: "
    login_failed: str = "\r\n% Login invalid\r\n\r\n"
    enable_command: str | None = None
    enable_prompt: str = "Password: "
    #: "reprompt": ask again (IOS), otherwise this text then the unprivileged prompt.
    enable_failed: str = "reprompt"
    enable_ok: str = ""
    paging_off: dict[str, str] = field(default_factory=dict)
    #: Other commands that only print something (e.g. `terminal width`).
    settings: dict[str, str] = field(default_factory=dict)
    pager: str = " --More-- "
    erase: Callable[[str], str] = _bs_erase
    invalid: str = "% Invalid input detected at '^' marker.\r\n"
    #: Printed before a command's output (D-Link repeats the command).
    output_header: str = ""
    #: Asked once after login; the expected answer.
    login_question: tuple[str, str] | None = None
    username_suffix_allowed: bool = False
    exit_commands: tuple[str, ...] = ("exit", "quit", "logout")


PROFILES: dict[str, Profile] = {
    "generic": Profile(
        platform="generic",
        prompt="admin@dev01:~$ ",
        banner="Welcome to dev01 (embedded Linux)\r\n",
        username_prompt="dev01 login: ",
        login_failed="\r\nLogin incorrect\r\n",
        pager="--More--",
        invalid="-sh: {command}: command not found\r\n",
    ),
    "cisco_ios": Profile(
        platform="cisco_ios",
        prompt="sw1>",
        privileged_prompt="sw1#",
        banner="\r\nUser Access Verification\r\n\r\n",
        enable_command="enable",
        paging_off={"terminal length 0": ""},
        settings={"terminal width 511": ""},
    ),
    "huawei_vrp": Profile(
        platform="huawei_vrp",
        prompt="<HUAWEI>",
        privileged_prompt="<HUAWEI>",
        banner="\r\nInfo: The max number of VTY users is 10, and the number\r\n"
        "      of current VTY users on line is 1.\r\n",
        username_prompt="Username:",
        password_prompt="Password:",
        login_failed="\r\nError: Username or password error.\r\n",
        enable_command="super",
        enable_prompt="Password:",
        enable_failed="Error: Failed to pass the authentication.\r\n",
        enable_ok="Now user privilege is 15 level, and only commands whose level is equal to or "
        "less than this level can be used.\r\nPrivilege note: 0-VISIT, 1-MONITOR, 2-SYSTEM, "
        "3-MANAGE\r\n",
        paging_off={
            "screen-length 0 temporary": "Info: The configuration takes effect on the current "
            "user terminal interface only.\r\n"
        },
        pager="  ---- More ----",
        erase=_ansi_erase,
        invalid="              ^\r\nError: Unrecognized command found at '^' position.\r\n",
        login_question=("The password needs to be changed. Change now? [Y/N]: ", "n"),
    ),
    "dlink": Profile(
        platform="dlink",
        prompt="DES-3200-28:user#",
        privileged_prompt="DES-3200-28:admin#",
        banner="\r\n                   DES-3200-28 Fast Ethernet Switch\r\n"
        "                        Command Line Interface\r\n\r\n"
        "                       Firmware: Build 4.04.005\r\n"
        "        Copyright(C) 2013 D-Link Corporation. All rights reserved.\r\n",
        username_prompt="UserName:",
        password_prompt="PassWord:",
        login_failed="\r\nIncorrect Login/Password\r\n\r\n",
        enable_command="enable admin",
        enable_prompt="PassWord:",
        enable_failed="Fail!\r\n",
        paging_off={"disable clipaging": "Command: disable clipaging\r\n\r\nSuccess.\r\n"},
        pager="CTRL+C ESC q Quit SPACE n Next Page ENTER Next Entry a All",
        erase=_cr_erase,
        invalid="Available commands:\r\n..        ?         cable_diag  cfm       clear\r\n",
        output_header="Command: {command}\r\n\r\n",
    ),
    "eltex": Profile(
        platform="eltex",
        prompt="mes2324>",
        privileged_prompt="mes2324#",
        banner="\r\n\r\n",
        username_prompt="User Name:",
        login_failed="\r\n% Authentication failed\r\n\r\n",
        enable_command="enable",
        enable_failed="% Access denied\r\n",
        paging_off={"terminal datadump": ""},
        pager="More: <space>,  Quit: q or CTRL+Z, One line: <return> ",
        erase=_cr_clear,
        invalid="% Unrecognized command\r\n",
    ),
    "zte": Profile(
        platform="zte",
        prompt="ZXAN>",
        privileged_prompt="ZXAN#",
        banner="\r\n******************************************\r\n"
        "Welcome to ZXAN product C300 of ZTE Corporation\r\n"
        "******************************************\r\n\r\n",
        login_failed="\r\n%Error 20204: Login failed.\r\n",
        enable_command="enable",
        enable_failed="%Error 20203: Incorrect password.\r\n",
        paging_off={"terminal length 0": ""},
        pager="--More--",
        invalid="%Error 20200: Invalid command.\r\n",
    ),
    "mikrotik_routeros": Profile(
        platform="mikrotik_routeros",
        prompt="[admin@MikroTik] > ",
        banner="\r\n\r\n  MMM      MMM       KKK                          TTTTTTTTTTT      KKK\r\n"
        "  MikroTik RouterOS 6.49.7 (c) 1999-2022       https://www.mikrotik.com/\r\n\r\n",
        username_prompt="Login: ",
        login_failed="\r\nLogin failed, incorrect username or password\r\n\r\n",
        pager="-- [Q quit|D dump|down]",
        erase=_cr_clear,
        invalid="bad command name {command} (line 1 column 1)\r\n",
        username_suffix_allowed=True,
    ),
    "juniper_junos": Profile(
        platform="juniper_junos",
        prompt="admin@vmx1> ",
        banner="--- JUNOS 18.2R1.9 Kernel 64-bit  JNPR-11.0-20180614.6c3f819_buil\r\n",
        username_prompt="login: ",
        login_failed="\r\nLogin incorrect\r\n",
        paging_off={"set cli screen-length 0": "Screen length set to 0\r\n"},
        settings={"set cli screen-width 0": "Screen width set to 0\r\n"},
        pager="---(more)---",
        erase=_cr_erase,
        invalid="                  ^\r\nunknown command.\r\n",
    ),
}


def _lines(platform: str, command: str, count: int) -> list[str]:
    out = []
    for i in range(1, count + 1):
        if i % 7 == 0:
            out.append("")
        elif i % 3 == 0:
            out.append(f"  {platform} {command} indented line {i:03d}")
        else:
            out.append(f"{platform} {command} line {i:03d} | value {i * 37 % 1000}")
    return out


OUTPUT_SIZES = {
    "show version": 30,
    "show long": 100,
    "show running-config": 60,
    "show big": 12000,
    "show slow": 30,
    "show stall": 100,
    "show drop": 100,
    "show empty": 0,
}


def _output_lines(platform: str, command: str) -> list[str]:
    profile = PROFILES[platform]
    lines = _lines(platform, command, OUTPUT_SIZES[command])
    header = profile.output_header.format(command=command)
    return header.split("\r\n")[:-1] + lines if header else lines


def expected_output(platform: str, command: str) -> str:
    """What the driver should return for `command` (clean, without echo or prompt)."""
    lines = _output_lines(platform, command)
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


@dataclass
class DeviceStats:
    connections: int = 0
    auth_attempts: int = 0
    logins: int = 0
    commands: list[str] = field(default_factory=list)
    enable_attempts: int = 0
    #: Every character the client typed (tests check secrets are only typed where expected).
    typed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Behaviour:
    """The awkward parts, switched on per test."""

    pager_can_be_disabled: bool = True
    #: Seconds between lines of `show slow`.
    slow_line_delay: float = 0.02
    #: Lines of `show stall` sent before it stops.
    stall_after: int = 5
    #: Ask for username/password again inside the SSH channel (D-Link and some others do).
    in_channel_login: bool = False


class CliEmulator:
    """One session of a vendor CLI: feed it typed text, get actions back."""

    def __init__(
        self,
        profile: Profile,
        behaviour: Behaviour,
        stats: DeviceStats,
        *,
        login: bool,
        username: str = USERNAME,
        password: str = PASSWORD,
        enable_secret: str = ENABLE_SECRET,
    ) -> None:
        self.p = profile
        self.b = behaviour
        self.stats = stats
        self.username, self.password, self.enable_secret = username, password, enable_secret
        self.state = "username" if login else "cmd"
        self.privileged = profile.enable_command is None
        self.paging = True
        self.buf = ""
        self.pending: list[str] = []
        self.pending_tail: list[Action] = []
        self.login_user = ""
        self.login_tries = 0
        self.enable_tries = 0
        self._last_cr = False

    def prompt(self) -> str:
        if self.privileged and self.p.privileged_prompt:
            return self.p.privileged_prompt
        return self.p.prompt

    def start(self) -> list[Action]:
        out: list[Action] = [self.p.banner]
        if self.state == "username":
            out.append(self.p.username_prompt)
        else:
            out += self._logged_in()
        return out

    def _logged_in(self) -> list[Action]:
        self.stats.logins += 1
        if self.p.login_question:
            self.state = "question"
            return [self.p.login_question[0]]
        self.state = "cmd"
        return [self.prompt()]

    # -- input

    def feed(self, data: str) -> list[Action]:
        out: list[Action] = []
        for ch in data:
            self.stats.typed.append(ch)
            if self.state == "closed":
                break
            if self.state == "more":
                out += self._more_key(ch)
                continue
            if ch in "\r\n":
                if ch == "\n" and self._last_cr:
                    self._last_cr = False
                    continue
                self._last_cr = ch == "\r"
                line, self.buf = self.buf, ""
                out += self._enter(line)
                continue
            self._last_cr = False
            if ch in ("\x7f", "\b"):
                if self.buf:
                    self.buf = self.buf[:-1]
                    if self._echoes():
                        out.append("\b \b")
                continue
            if ch == "\x00":
                continue
            self.buf += ch
            if self._echoes():
                out.append(ch)
        return out

    def _echoes(self) -> bool:
        return self.state in ("cmd", "username", "question")

    def _enter(self, line: str) -> list[Action]:
        handler = {
            "username": self._got_username,
            "password": self._got_password,
            "question": self._got_answer,
            "enable_pw": self._got_enable_secret,
        }.get(self.state, self._command)
        return handler(line)

    def _got_username(self, line: str) -> list[Action]:
        name = line.strip()
        if self.p.username_suffix_allowed and "+" in name:
            name = name.split("+", 1)[0]
        self.login_user = name
        self.state = "password"
        return ["\r\n", self.p.password_prompt]

    def _got_password(self, line: str) -> list[Action]:
        self.stats.auth_attempts += 1
        self.login_tries += 1
        if self.login_user == self.username and line == self.password:
            return ["\r\n", *self._logged_in()]
        if self.login_tries >= 3:
            self.state = "closed"
            return [self.p.login_failed, Close()]
        self.state = "username"
        return [self.p.login_failed, self.p.username_prompt]

    def _got_answer(self, line: str) -> list[Action]:
        assert self.p.login_question is not None
        if line.strip().lower() != self.p.login_question[1]:
            return ["\r\n", self.p.login_question[0]]
        self.state = "cmd"
        return ["\r\n", self.prompt()]

    def _got_enable_secret(self, line: str) -> list[Action]:
        self.stats.enable_attempts += 1
        self.enable_tries += 1
        self.state = "cmd"
        if line == self.enable_secret:
            self.privileged = True
            return ["\r\n", self.p.enable_ok, self.prompt()]
        if self.p.enable_failed == "reprompt":
            if self.enable_tries < 3:
                self.state = "enable_pw"
                return ["\r\n", self.p.enable_prompt]
            return ["\r\n% Bad secrets\r\n\r\n", self.prompt()]
        return ["\r\n", self.p.enable_failed, self.prompt()]

    # -- commands

    def _command(self, line: str) -> list[Action]:
        command = " ".join(line.split())
        if not command:
            return ["\r\n", self.prompt()]
        self.stats.commands.append(command)
        return ["\r\n", *self._reply(command)]

    def _reply(self, command: str) -> list[Action]:  # noqa: PLR0911 - one branch per kind
        if command in self.p.exit_commands:
            self.state = "closed"
            return [Close()]
        if command == self.p.enable_command:
            self.enable_tries = 0
            self.state = "enable_pw"
            return [self.p.enable_prompt]
        if command in self.p.paging_off:
            if not self.b.pager_can_be_disabled:
                return [self._invalid(command), self.prompt()]
            self.paging = False
            return [self.p.paging_off[command], self.prompt()]
        if command in self.p.settings:
            return [self.p.settings[command], self.prompt()]
        if command not in OUTPUT_SIZES or (
            command == "show running-config" and not self.privileged
        ):
            return [self._invalid(command), self.prompt()]
        return [*self._output(command)]

    def _invalid(self, command: str) -> str:
        return self.p.invalid.format(command=command)

    def _output(self, command: str) -> list[Action]:
        lines = [line + "\r\n" for line in _output_lines(self.p.platform, command)]
        if command == "show slow":
            paced: list[Action] = []
            for line in lines:
                paced += [line, Sleep(self.b.slow_line_delay)]
            return [*paced, self.prompt()]
        if command == "show stall":
            return [*lines[: self.b.stall_after], Stall()]
        if command == "show drop":
            self.pending_tail = [Close()]
        if not self.paging or len(lines) < PAGE:
            return [*lines, self.prompt()]
        self.pending = lines
        return self._page()

    def _page(self) -> list[Action]:
        chunk, self.pending = self.pending[: PAGE - 1], self.pending[PAGE - 1 :]
        if self.pending:
            self.state = "more"
            if self.pending_tail:
                tail, self.pending_tail = self.pending_tail, []
                self.state = "closed"
                return ["".join(chunk), *tail]
            return ["".join(chunk), self.p.pager]
        self.state = "cmd"
        return ["".join(chunk), self.prompt()]

    def _more_key(self, ch: str) -> list[Action]:
        erase = self.p.erase(self.p.pager)
        if ch in "qQ\x03":
            self.pending = []
            self.state = "cmd"
            return [erase, self.prompt()]
        if ch in "\r\n":
            line, self.pending = self.pending[0], self.pending[1:]
            if self.pending:
                return [erase, line, self.p.pager]
            self.state = "cmd"
            return [erase, line, self.prompt()]
        return [erase, *self._page()]


async def _perform(actions: list[Action], write: Callable[[str], None]) -> bool:
    """Carry out actions; True when the session should end."""
    for action in actions:
        if isinstance(action, str):
            if action:
                write(action)
        elif isinstance(action, Sleep):
            await asyncio.sleep(action.seconds)
        elif isinstance(action, Stall):
            await asyncio.Event().wait()
        else:
            return True
    return False


# --------------------------------------------------------------------------------------------
# SSH


class FakeSshDevice:
    """An asyncssh server behaving like `profile`'s CLI (and running exec requests)."""

    def __init__(
        self,
        profile: Profile,
        behaviour: Behaviour = Behaviour(),
        *,
        host_key: asyncssh.SSHKey | None = None,
        port: int = 0,
    ) -> None:
        self.profile = profile
        self.behaviour = behaviour
        self.host_key = host_key or asyncssh.generate_private_key("ssh-ed25519")
        self.stats = DeviceStats()
        self.port = port
        self._server: asyncssh.SSHAcceptor | None = None
        self._conns: list[asyncssh.SSHServerConnection] = []

    @property
    def public_key(self) -> str:
        return " ".join(self.host_key.export_public_key().decode().split()[:2])

    async def start(self) -> None:
        device = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                device.stats.connections += 1
                device._conns.append(conn)

            def begin_auth(self, username: str) -> bool:
                return True

            def password_auth_supported(self) -> bool:
                return True

            def validate_password(self, username: str, password: str) -> bool:
                device.stats.auth_attempts += 1
                user = (
                    username.split("+", 1)[0]
                    if device.profile.username_suffix_allowed
                    else username
                )
                return user == USERNAME and password == PASSWORD

        self._server = await asyncssh.create_server(
            Server,
            HOST,
            self.port,
            server_host_keys=[self.host_key],
            process_factory=self._handle,
            line_editor=False,
            encoding="utf-8",
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, process: asyncssh.SSHServerProcess[str]) -> None:
        emulator = CliEmulator(
            self.profile, self.behaviour, self.stats, login=self.behaviour.in_channel_login
        )
        if process.command is not None:  # exec request: one command, no pager, no prompt
            self.stats.commands.append(process.command)
            if process.command in OUTPUT_SIZES:
                text = "".join(
                    f"{x}\r\n" for x in _output_lines(self.profile.platform, process.command)
                )
                process.stdout.write(text)
                process.exit(0)
            else:
                process.stderr.write(emulator._invalid(process.command))
                process.exit(1)
            return
        try:
            done = await _perform(emulator.start(), process.stdout.write)
            while not done:
                data = await process.stdin.read(1024)
                if not data:
                    break
                done = await _perform(emulator.feed(data), process.stdout.write)
        except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged, asyncssh.ConnectionLost):
            pass
        with contextlib.suppress(Exception):
            process.exit(0)

    def drop_connections(self) -> None:
        """Abort every open connection (the client is not told)."""
        for conn in self._conns:
            conn.abort()
        self._conns.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.drop_connections()


@contextlib.asynccontextmanager
async def fake_ssh_device(
    platform: str = "cisco_ios", behaviour: Behaviour = Behaviour(), **kwargs: object
) -> AsyncIterator[FakeSshDevice]:
    device = FakeSshDevice(PROFILES[platform], behaviour, **kwargs)  # type: ignore[arg-type]
    await device.start()
    try:
        yield device
    finally:
        await device.close()


# --------------------------------------------------------------------------------------------
# Telnet


class FakeTelnetDevice:
    """A telnetlib3 server behaving like `profile`'s CLI, login included."""

    def __init__(self, profile: Profile, behaviour: Behaviour = Behaviour()) -> None:
        self.profile = profile
        self.behaviour = behaviour
        self.stats = DeviceStats()
        self.port = 0
        self._server: telnetlib3.server.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await telnetlib3.create_server(
            host=HOST,
            port=0,
            shell=self._shell,
            encoding=False,
            connect_maxwait=0.5,
            timeout=0,
        )
        sockets = self._server.sockets
        assert sockets
        self.port = sockets[0].getsockname()[1]

    async def _shell(
        self,
        reader: telnetlib3.TelnetReader | telnetlib3.TelnetReaderUnicode,
        writer: telnetlib3.TelnetWriter | telnetlib3.TelnetWriterUnicode,
    ) -> None:
        assert isinstance(writer, telnetlib3.TelnetWriter)
        self.stats.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        emulator = CliEmulator(self.profile, self.behaviour, self.stats, login=True)

        def write(text: str) -> None:
            writer.write(text.encode())

        try:
            done = await _perform(emulator.start(), write)
            while not done:
                data = await reader.read(1024)
                if not data:
                    break
                text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                done = await _perform(emulator.feed(text), write)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def fake_telnet_device(
    platform: str = "cisco_ios", behaviour: Behaviour = Behaviour()
) -> AsyncIterator[FakeTelnetDevice]:
    device = FakeTelnetDevice(PROFILES[platform], behaviour)
    await device.start()
    try:
        yield device
    finally:
        await device.close()


# --------------------------------------------------------------------------------------------
# A port that accepts TCP and never says anything


class SilentServer:
    """Accepts connections and never sends a byte (no SSH banner, no login prompt)."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._hold, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass
        writer.close()

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[SilentServer]:
    server = SilentServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def with_behaviour(profile: Profile, **changes: object) -> Profile:
    return replace(profile, **changes)  # type: ignore[arg-type]
