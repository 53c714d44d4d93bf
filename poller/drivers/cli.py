"""`ssh.cli` and `telnet.cli`: interactive vendor CLIs over scrapli's asyncssh and asynctelnet.

scrapli (1.x, pinned) provides the transports: SSH through asyncssh with the host-key policy and
credentials of `ssh.py` passed in `transport_options`, telnet with option negotiation. On top of
its transport this module runs the dialogue itself, driven by the platform data of
`platforms.yaml`:

1. login: answer username/password prompts (telnet, and SSH devices that ask again in the
   channel), questions such as "change password now?", and pagers in banners, until a prompt;
2. `enable` when the job asks for it and the prompt is not privileged yet;
3. the platform's paging-off commands (their output and errors are ignored);
4. each command: send it, read until the prompt, answering every pager on the way. A small
   terminal model (`Screen`) applies backspaces, carriage returns and cursor-left/erase-line
   sequences, so pager prompts and their erase sequences leave no residue; the echo line and the
   prompt are dropped. Output hitting an error marker stops the job with `command_error`.

The whole job runs under one deadline (`ctx.deadline`); a connect timeout is `device_timeout`,
never `auth_failed` (scrapli raises `ScrapliAuthenticationFailed` for a connect timeout, so errors
are mapped by their `__cause__`).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import structlog
from scrapli.driver import AsyncGenericDriver
from scrapli.exceptions import (
    ScrapliAuthenticationFailed,
    ScrapliConnectionError,
    ScrapliConnectionNotOpened,
    ScrapliException,
    ScrapliTimeout,
)

from poller.drivers.base import Auth, Data, JobContext
from poller.drivers.platforms import Platform, load_platforms
from poller.drivers.ssh import (
    DEADLINE_MARGIN,
    SSH_ERRORS,
    HostKeyCheck,
    SshHostKeys,
    map_connect_error,
    shared_host_keys,
)
from poller.errors import (
    DeviceAuthError,
    DeviceCommandError,
    DeviceTimeoutError,
    DeviceUnreachableError,
    InternalJobError,
    JobError,
    OutputTooLargeError,
)
from poller.wire import CliAuth, CliJob, JobKind, JobRequest

if TYPE_CHECKING:
    from pydantic import JsonValue

    from poller.config import PollerSettings

__all__ = ["CliDriver", "Screen", "clean_output"]

log = structlog.get_logger(__name__)

TELNET_PORT = 23
SSH_PORT = 22
#: A prompt that only matches the platform pattern (not the prompt seen at login) is accepted
#: when no more output follows within this many seconds (a line of output can look like one).
PROMPT_SETTLE = 0.15
#: Without any output for this long after connecting, send one return (consoles need a nudge).
WAKE_UP_AFTER = 2.0
_CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
_MAX_LINE = 65536
#: What scrapli, asyncssh and sockets raise when a connection fails (mapped by `map_cli_error`).
_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (ScrapliException, *SSH_ERRORS)


# --------------------------------------------------------------------------------------------
# Terminal model


class Screen:
    """Turns raw terminal output into lines, as a terminal would show them.

    Handles `\\r`, `\\n`, backspace, CSI cursor-left/right (`ESC[nD`, `ESC[nC`) and erase-line
    (`ESC[K`, `ESC[2K`); other escape sequences and control characters are dropped. Feed it
    chunks as they arrive (escape sequences may be split between chunks).
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        #: Lines committed since start: lets callers tell "new output" from "the same line".
        self.serial = 0
        self._line: list[str] = []
        self._col = 0
        self._pending = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        #: The current line held a pager prompt: trailing blanks left by its erasure are cut.
        self.paged = False

    @property
    def current(self) -> str:
        return "".join(self._line)

    def feed_bytes(self, data: bytes) -> None:
        self.feed(self._decoder.decode(data))

    def feed(self, text: str) -> None:
        text = self._pending + text
        self._pending = ""
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch == "\x1b":
                consumed = self._escape(text, i)
                if consumed == 0:
                    self._pending = text[i:]
                    return
                i += consumed
                continue
            i += 1
            if ch == "\n":
                self._commit()
            elif ch == "\r":
                self._col = 0
            elif ch == "\b":
                self._col = max(0, self._col - 1)
            elif ch == "\t" or ch >= " ":
                self._put(ch)

    def _escape(self, text: str, i: int) -> int:
        """Apply the escape sequence at text[i]; return its length, or 0 if it is incomplete."""
        if i + 1 >= len(text):
            return 0
        if text[i + 1] == "[":
            match = _CSI.match(text, i)
            if match is None:
                # Incomplete (or garbage): wait for more unless it is already implausibly long.
                return 0 if len(text) - i < 32 else 2
            self._csi(match.group(1), match.group(2))
            return match.end() - i
        if text[i + 1] == "]":  # OSC ... BEL or ST
            end = text.find("\x07", i)
            st = text.find("\x1b\\", i + 2)
            ends = [e + 1 for e in (end,) if e >= 0] + [s + 2 for s in (st,) if s >= 0]
            return (min(ends) - i) if ends else 0
        return 2

    def _csi(self, params: str, final: str) -> None:
        count = int(params) if params.isdigit() else 1
        if final == "D":
            self._col = max(0, self._col - count)
        elif final == "C":
            self._col += count
        elif final == "K":
            if params in ("", "0"):
                del self._line[self._col :]
            elif params == "1":
                for k in range(min(self._col + 1, len(self._line))):
                    self._line[k] = " "
            elif params == "2":
                self._line = [" "] * len(self._line)
        elif final == "G":
            self._col = max(0, count - 1)

    def _put(self, ch: str) -> None:
        if self._col < len(self._line):
            self._line[self._col] = ch
        else:
            if self._col > len(self._line):
                self._line.extend(" " * (self._col - len(self._line)))
            if len(self._line) >= _MAX_LINE:
                self._commit()
            self._line.append(ch)
        self._col += 1

    def _commit(self) -> None:
        line = "".join(self._line)
        if self.paged:
            line = line.rstrip()
            self.paged = False
        self.lines.append(line)
        self.serial += 1
        self._line = []
        self._col = 0

    def take_lines(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    @property
    def size(self) -> int:
        """Characters held (committed and current), for the output cap."""
        return sum(len(line) + 1 for line in self.lines) + len(self._line)


def _squash(text: str) -> str:
    return "".join(text.split()).lower()


def clean_output(lines: list[str], command: str, pagers: list[re.Pattern[str]]) -> str:
    """A command's output: without the echo line, pager residue, and blank edges."""
    if lines and _squash(command) and _squash(lines[0]).endswith(_squash(command)):
        lines = lines[1:]
    out = []
    for raw in lines:
        line = raw
        for pager in pagers:
            match = pager.search(line)
            if match:
                line = (line[: match.start()] + line[match.end() :]).rstrip()
        out.append(line)
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The dialogue


class _DeviceClosedError(Exception):
    """The device ended the session."""


class _OverCapError(Exception):
    """The job's output cap was reached."""


@dataclass(slots=True)
class _Progress:
    """What the job has gathered so far (kept in the error's data on failure)."""

    results: list[dict[str, JsonValue]] = field(default_factory=list)
    prompt: str = ""
    host_key: dict[str, JsonValue] | None = None
    current_command: str | None = None
    partial: str = ""

    def data(self) -> Data:
        results: list[JsonValue] = list(self.results)
        if self.current_command is not None:
            results.append({"command": self.current_command, "output": self.partial})
        out: Data = {"results": results, "prompt": self.prompt}
        if self.host_key is not None:
            out["host_key"] = self.host_key
        return out


class _Session:
    """One login on one device: reads through scrapli's transport, renders into a `Screen`."""

    def __init__(
        self,
        conn: AsyncGenericDriver,
        platform: Platform,
        auth: CliAuth,
        *,
        max_output: int,
        progress: _Progress,
    ) -> None:
        self.conn = conn
        self.platform = platform
        self.auth = auth
        self.screen = Screen()
        self.max_output = max_output
        self.used = 0
        self.progress = progress
        self.prompt = ""
        self._prompt_re = platform.regex(platform.prompt)
        self._pagers = [(p.regex, p.answer) for p in platform.pagers]
        self._pager_res = [p.regex for p in platform.pagers]
        self._errors = platform.any_of(platform.error_markers)
        self._login_failed = platform.any_of(platform.login_failed)
        self._user_re = platform.regex(platform.username_prompt)
        self._pass_re = platform.regex(platform.password_prompt)
        self._answered: tuple[int, str] | None = None
        self._candidate = ""

    # -- reading and writing

    def send(self, text: str, *, secret: bool = False) -> None:
        self.conn.channel.write(text + self.platform.return_char, redacted=secret)

    async def read(self, timeout: float | None = None) -> bool:
        """Read one chunk into the screen; False if `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.conn.transport.read()
        except TimeoutError:
            if timeout is None:
                raise
            return False
        except ScrapliConnectionError:
            raise _DeviceClosedError from None
        if not data:
            if self.conn.transport.isalive():
                return True
            raise _DeviceClosedError
        fits = max(0, self.max_output - self.used)
        self.used += len(data)
        self.screen.feed_bytes(data[:fits])
        if self.used > self.max_output:
            raise _OverCapError
        return True

    def answer_pager(self) -> bool:
        """Answer a pager at the end of the current line (once per appearance)."""
        current = self.screen.current
        for regex, answer in self._pagers:
            if regex.search(current):
                seen = (self.screen.serial, current)
                if seen != self._answered:
                    self._answered = seen
                    self.screen.paged = True
                    self.conn.channel.write(answer)
                return True
        return False

    async def next_event(self) -> bool:
        """Read on; True once the device waits at its prompt, False after other output.

        Pagers are answered on the way. A line that is exactly the known prompt counts at
        once; one that only matches the platform's prompt pattern counts when no more output
        follows within `PROMPT_SETTLE` seconds, and becomes the known prompt.
        """
        if not await self.read(PROMPT_SETTLE if self._candidate else None):
            self.prompt, self._candidate = self._candidate, ""
            return True
        return self._evaluate()

    def _evaluate(self) -> bool:
        """Look at the current line after new output: answer a pager, or spot the prompt."""
        self._candidate = ""
        if self.answer_pager():
            return False
        current = self.screen.current.rstrip()
        if self.prompt and current == self.prompt:
            return True
        if self._prompt_re.search(self.screen.current):
            self._candidate = current
        return False

    async def read_until_prompt(self) -> None:
        while not await self.next_event():
            pass

    # -- steps

    async def login(self) -> None:
        """Reach the first prompt: credentials in the channel if asked, questions, pagers."""
        sent_user = sent_password = -1
        answers = [(a.regex, a.answer) for a in self.platform.login_answers]
        at_prompt = False
        if await self.read(WAKE_UP_AFTER):
            at_prompt = self._evaluate()
        else:
            self.conn.channel.write(self.platform.return_char)
        while not at_prompt:
            current = self.screen.current
            serial = self.screen.serial
            if sent_password >= 0 and serial > sent_password:
                self._check_login_failed()
            if self._pass_re.search(current):
                password = self.auth.password.get_secret_value() if self.auth.password else None
                sent_password = self._credential("password", password, sent_password)
            elif self._user_re.search(current):
                user = (self.auth.username or "") + self.platform.username_suffix
                sent_user = self._credential("login", user, sent_user)
            else:
                for regex, answer in answers:
                    if regex.search(current):
                        self.send(answer)
                        break
            at_prompt = await self.next_event()
        self.screen.take_lines()
        self.progress.prompt = self.prompt

    def _credential(self, what: str, value: str | None, sent: int) -> int:
        """Answer a login or password prompt once; a second prompt means it was rejected."""
        if sent >= 0:
            if self.screen.serial > sent:
                raise DeviceAuthError(f"the device asked for the {what} again: rejected")
            return sent
        if value is None:
            raise DeviceAuthError(f"the device asks for a {what} but the job has none")
        self.send(value, secret=what == "password")
        return self.screen.serial

    def _check_login_failed(self) -> None:
        recent = "\n".join([*self.screen.lines[-5:], self.screen.current])
        if self._login_failed is not None and self._login_failed.search(recent):
            raise DeviceAuthError("the device rejected the login")

    async def enable(self) -> None:
        """Enter privileged mode with `auth.enable_password`; a refusal is `auth_failed`."""
        spec = self.platform.enable
        privileged = self.platform.privileged_prompt
        if spec is None:
            return
        if privileged and self.platform.regex(privileged).search(self.prompt):
            return
        self.screen.take_lines()
        self.send(spec.command)
        self.prompt = ""  # the prompt may change with the privilege
        start = self.screen.serial
        sent = -1
        while not await self.next_event():
            if not self._pass_re.search(self.screen.current) or self.screen.serial == start:
                continue
            if sent >= 0:
                if self.screen.serial > sent:
                    raise DeviceAuthError("the enable secret was rejected")
                continue
            if self.auth.enable_password is None:
                raise DeviceAuthError(
                    "the device asks for an enable secret but auth.enable_password is not set"
                )
            self.send(self.auth.enable_password.get_secret_value(), secret=True)
            sent = self.screen.serial
        text = "\n".join(self.screen.take_lines())
        failed = self.platform.any_of(spec.failed)
        if failed is not None and failed.search(text):
            raise DeviceAuthError("the enable secret was rejected")
        if privileged and not self.platform.regex(privileged).search(self.prompt):
            raise DeviceAuthError("enable did not reach privileged mode (secret rejected?)")
        self.progress.prompt = self.prompt

    async def run(self, command: str, *, record: bool = True) -> tuple[str, bool]:
        """Run one command; return its clean output and whether it hit an error marker.

        With `record`, a failure midway leaves the command and its partial output in the
        job's data.
        """
        self.screen.take_lines()
        if record:
            self.progress.current_command, self.progress.partial = command, ""
        self.send(command)
        try:
            await self.read_until_prompt()
        except BaseException:
            lines = self.screen.take_lines()
            if lines or self.screen.current.rstrip() != self.prompt:
                lines.append(self.screen.current)
            self.progress.partial = clean_output(lines, command, self._pager_res)
            raise
        output = clean_output(self.screen.take_lines(), command, self._pager_res)
        self.progress.current_command = None
        self.progress.prompt = self.prompt
        failed = bool(self._errors and self._errors.search(output))
        return output, failed


# --------------------------------------------------------------------------------------------
# Error mapping


def map_cli_error(exc: BaseException, target: str) -> JobError:
    """The job error for a scrapli/asyncssh/socket failure, judged by the cause chain."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            break
        mapped = map_connect_error(seen, target)
        if mapped is not None and not isinstance(seen, ScrapliException):
            return mapped
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, ScrapliTimeout):
        return DeviceTimeoutError(f"{target} did not answer in time")
    if isinstance(exc, ScrapliAuthenticationFailed):
        return DeviceAuthError(f"{target} rejected the credentials")
    if isinstance(exc, ScrapliConnectionError | ScrapliConnectionNotOpened):
        return DeviceUnreachableError(f"{target} closed or refused the connection")
    return DeviceUnreachableError(f"{target}: {type(exc).__name__}")


# --------------------------------------------------------------------------------------------
# The driver


class CliDriver:
    """Runs `ssh.cli` and `telnet.cli` jobs; one login per job."""

    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.SSH_CLI, JobKind.TELNET_CLI})

    def __init__(self, host_keys: SshHostKeys, platforms: dict[str, Platform] | None = None):
        self.host_keys = host_keys
        self.platforms = platforms if platforms is not None else load_platforms()

    @classmethod
    def from_settings(cls, settings: PollerSettings) -> CliDriver:
        return cls(shared_host_keys(settings))

    async def run(self, job: JobRequest, auth: Auth | None, ctx: JobContext) -> Data:
        if not isinstance(job, CliJob):
            raise InternalJobError(f"{type(self).__name__} cannot run {job.kind}")
        platform = self.platforms.get(job.params.platform)
        if platform is None:
            known = ", ".join(sorted(self.platforms))
            raise DeviceCommandError(f"unknown platform {job.params.platform!r} (known: {known})")
        if auth is not None and not isinstance(auth, CliAuth):
            raise DeviceAuthError(f"{job.kind} needs CLI credentials")
        auth = auth or CliAuth()
        telnet = job.kind == "telnet.cli"
        port = job.target.port or (TELNET_PORT if telnet else SSH_PORT)
        target = f"{job.target.host}:{port}"
        progress = _Progress()
        conn: AsyncGenericDriver | None = None
        try:
            async with asyncio.timeout_at(ctx.deadline - DEADLINE_MARGIN):
                conn, check = await self._open(job, auth, platform, port, ctx)
                if check is not None:
                    progress.host_key = check.report(getattr(conn.transport, "session", None))
                session = _Session(
                    conn, platform, auth, max_output=ctx.max_output_bytes, progress=progress
                )
                await self._dialogue(session, job, progress)
        except TimeoutError:
            raise DeviceTimeoutError(
                f"{target} did not finish in time", data=progress.data()
            ) from None
        except _OverCapError:
            raise OutputTooLargeError(
                f"output exceeds the cap of {ctx.max_output_bytes} bytes", data=progress.data()
            ) from None
        except _DeviceClosedError:
            raise DeviceUnreachableError(
                f"{target} closed the session", data=progress.data()
            ) from None
        except JobError as exc:
            exc.data = exc.data or progress.data()
            raise
        except _TRANSPORT_ERRORS as exc:
            error = map_cli_error(exc, target)
            error.data = progress.data()
            raise error from None
        finally:
            if conn is not None:
                _close(conn, platform)
        return progress.data()

    async def _open(
        self,
        job: CliJob,
        auth: CliAuth,
        platform: Platform,
        port: int,
        ctx: JobContext,
    ) -> tuple[AsyncGenericDriver, HostKeyCheck | None]:
        remaining = max(0.1, ctx.remaining())
        check: HostKeyCheck | None = None
        options: dict[str, object] = {}
        if job.kind == "ssh.cli":
            login = auth.model_copy(
                update={"username": (auth.username or "") + platform.username_suffix}
            )
            kwargs, check = await self.host_keys.connect_kwargs(job.target.host, port, login)
            options = {"asyncssh": dict(kwargs)}
        conn = AsyncGenericDriver(
            host=job.target.host,
            port=port,
            auth_username=auth.username or "",
            auth_strict_key=False,  # checked by asyncssh itself with our known_hosts, see ssh.py
            auth_bypass=True,  # telnet logins are handled in the dialogue
            timeout_socket=remaining,
            timeout_transport=0,  # reads are bounded by the job deadline instead
            timeout_ops=remaining,
            comms_prompt_pattern=platform.prompt,
            comms_return_char=platform.return_char,
            transport="asynctelnet" if job.kind == "telnet.cli" else "asyncssh",
            transport_options=options,
            on_open=None,
        )
        try:
            await conn.open()
        except BaseException:
            _close(conn, platform, polite=False)
            raise
        finally:
            if check is not None:
                await self.host_keys.flush()
        log.debug("cli_session_opened", host=job.target.host, port=port, platform=platform.name)
        return conn, check

    async def _dialogue(self, session: _Session, job: CliJob, progress: _Progress) -> None:
        await session.login()
        if job.params.enable:
            await session.enable()
        for command in session.platform.paging_off:
            _, failed = await session.run(command, record=False)
            if failed:
                log.debug("cli_paging_off_refused", command=command)
        for command in job.params.commands:
            output, failed = await session.run(command)
            progress.results.append({"command": command, "output": output})
            if failed:
                raise DeviceCommandError(
                    f"command {len(progress.results)} of {len(job.params.commands)} "
                    "hit an error marker of the device",
                    data=progress.data(),
                )

    async def aclose(self) -> None:
        return None


def _close(conn: AsyncGenericDriver, platform: Platform, *, polite: bool = True) -> None:
    """Log out (without waiting for the device) and close the transport."""
    with contextlib.suppress(Exception):
        if polite and platform.exit_command and conn.transport.isalive():
            conn.channel.write(platform.exit_command + platform.return_char)
    with contextlib.suppress(Exception):
        conn.transport.close()
    with contextlib.suppress(Exception):
        conn.channel.close()
