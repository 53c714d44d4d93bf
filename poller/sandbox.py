"""Suspect jobs run in a child process of their own, so that a crash kills only that child.

A job that kills the process running it (a driver bug that aborts the interpreter, a segfault
in a C library) comes back after every crash, and RabbitMQ counts each return against every job
the dead process held: the innocent jobs delivered with it reach the queue's delivery limit too
(docs/reliability.md, scenario 11). So a job delivered `USM_POLLER_SANDBOX_AFTER` times before
(`x-delivery-count`; 2 by default: it was held by two processes that died) is a *suspect*: the
runner runs its driver here, in a child forked for that job alone, and gets its data or its
`JobError` back over a pipe. When the child dies without an answer, only that job is blamed
(`WorkerCrashedError`: the worker requeues it, and answers it `worker_crashed` on the last
delivery the queue allows); innocent jobs run in their own children and are answered.

First deliveries never come here: the fast path is unchanged.

Processes: the poller starts one *sandbox process* (`python -m poller.sandbox`) on its first
suspect job. It imports the drivers once, then forks one child per job (a fork of a
single-threaded process that has imported everything: milliseconds) and reports each child's
answer, or how it died. Its stdin and stdout are the protocol (frames: a 4-byte big-endian
length, then a pickle; both ends are this package); its stderr is the poller's log stream.
When the poller goes (even SIGKILLed), the sandbox process reads EOF, kills its children and
exits; a child whose sandbox process dies is killed by the kernel (`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import importlib
import math
import os
import pickle
import selectors
import signal
import struct
import sys
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from poller import testhooks
from poller.drivers.base import Auth, Data, JobContext
from poller.errors import JobError, WorkerCrashedError
from poller.logging import get_logger
from poller.pacing import PrioritySlots

if TYPE_CHECKING:
    from poller.config import PollerSettings
    from poller.wire import JobRequest

__all__ = [
    "Forked",
    "Sandbox",
    "SandboxBugError",
    "SandboxUnavailableError",
    "close_forked",
    "fork_sandbox",
]

log = get_logger("poller.sandbox")

_HEADER = struct.Struct(">I")
#: Seconds the sandbox process may take to import the drivers and say it is ready.
START_TIMEOUT = 60.0
#: After a failed start, suspect jobs run in the poller itself for this long before a retry.
RETRY_START_AFTER = 30.0
#: Seconds a request to the sandbox process may wait for its pipe (it reads all the time).
WRITE_TIMEOUT = 10.0
#: Seconds the sandbox process gets to exit after its stdin closes, before SIGKILL.
CLOSE_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1


class SandboxUnavailableError(Exception):
    """The sandbox process could not be started: the runner runs the job in-process."""


class SandboxBugError(RuntimeError):
    """The driver raised something other than a `JobError` in the child (a bug)."""


@dataclass(frozen=True, slots=True)
class _Request:
    tag: int
    job: JobRequest
    auth: Auth | None
    timeout: float
    max_output_bytes: int
    log_context: dict[str, Any]


def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


_JOB_ERRORS: dict[str, type[JobError]] = {}


def _job_error_classes(cls: type[JobError]) -> None:
    _JOB_ERRORS.setdefault(cls.__name__, cls)
    for sub in cls.__subclasses__():
        _job_error_classes(sub)


def _job_error(name: str, code: str, retryable: bool, message: str, data: Any) -> JobError:
    """The child's `JobError` again, of its class when `poller.errors` has it."""
    if not _JOB_ERRORS:
        _job_error_classes(JobError)
    cls = _JOB_ERRORS.get(name)
    if cls is None or cls.code != code:
        cls = type(name, (JobError,), {"code": code, "retryable": retryable})
    return cls(message, data=data)


# ------------------------------------------------------------------------------------------
# The poller's side


@dataclass(frozen=True, slots=True)
class Forked:
    """A sandbox process forked by `fork_sandbox` at start-up: its pid and pipe ends."""

    pid: int
    to_child: int
    from_child: int


def fork_sandbox(settings: PollerSettings) -> Forked | None:
    """Fork the sandbox process now, before the poller starts its event loop or any thread.

    It shares the poller's imported modules (no second start-up, no extra CPU) and waits idle
    for suspect jobs. None when the fork fails: the first suspect job starts one instead.
    """
    _preload(settings)
    req_r, req_w = os.pipe()
    ans_r, ans_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in (req_r, req_w, ans_r, ans_w):
            os.close(fd)
        log.warning("sandbox_not_forked", error=repr(exc))
        return None
    if pid == 0:  # the sandbox process: never returns
        code = 70
        try:
            os.close(req_w)
            os.close(ans_r)
            _ignore_stop_signals()
            code = _Zygote(req_r, ans_w, settings).serve(_Frames())
        finally:
            os._exit(code)
    os.close(req_r)
    os.close(ans_w)
    return Forked(pid, req_w, ans_r)


def close_forked(forked: Forked, timeout: float = CLOSE_TIMEOUT) -> None:
    """Stop a sandbox process that no event loop took over (the poller stops while still
    starting): close its pipes (it reads EOF and exits), reap it, SIGKILL after `timeout`."""
    for fd in (forked.to_child, forked.from_child):
        with contextlib.suppress(OSError):
            os.close(fd)
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(forked.pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(forked.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(forked.pid, 0)
            return
        time.sleep(0.01)


class _Channel:
    """The pipes to one sandbox process, and how to stop it."""

    def __init__(
        self,
        pid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        proc: asyncio.subprocess.Process | None = None,
    ) -> None:
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self._proc = proc

    @classmethod
    async def attach(cls, forked: Forked) -> _Channel:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(forked.from_child, "rb", 0)
        )
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(forked.to_child, "wb", 0)
        )
        return cls(forked.pid, reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def send(self, message: object) -> None:
        if self.writer.is_closing():
            raise WorkerCrashedError("the sandbox process is gone")
        self.writer.write(_frame(message))
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self.writer.drain()
        except (ConnectionError, TimeoutError) as exc:
            raise WorkerCrashedError(f"the sandbox process does not read ({exc!r})") from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Close its stdin (it kills its children and exits); SIGKILL after `CLOSE_TIMEOUT`."""
        self.writer.close()
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), CLOSE_TIMEOUT)
            except TimeoutError:
                self.kill()
                await self._proc.wait()
            return
        # Forked by this process: reap it here (no child watcher knows it).
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while True:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG: never blocks
            except ChildProcessError:
                return
            if done:
                return
            if time.monotonic() > deadline:
                self.kill()
                deadline = math.inf
            await asyncio.sleep(0.05)


class Sandbox:
    """Runs suspect jobs' drivers in child processes; `slots` children at once.

    `forked`: the sandbox process `fork_sandbox` made at start-up; without one (or once it has
    gone), the first suspect job starts one (`python -m poller.sandbox`: about a second of
    imports, counted against that job's deadline).
    """

    def __init__(
        self, settings: PollerSettings, *, slots: int, forked: Forked | None = None
    ) -> None:
        self._settings = settings
        self._slots = PrioritySlots(max(1, slots))
        self._forked = forked
        self._channel: _Channel | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self._start_lock = asyncio.Lock()
        self._next_tag = 0
        self._failed_at = -RETRY_START_AFTER
        self._closed = False
        #: Children started, and those that died without an answer (for tests and logs).
        self.started = 0
        self.crashed = 0

    @property
    def pid(self) -> int | None:
        """The sandbox process's pid (forked, or started and still running), else None."""
        if self._forked is not None:
            return self._forked.pid
        return self._channel.pid if self._channel is not None else None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of the `slots` children at once (wait under the job's deadline)."""
        await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    async def acquire(self, priority: int = 0) -> None:
        """Take one of the `slots` (`release` it after `run`): waiting jobs with a higher
        `priority` (their attempt number) first, then in arrival order. Suspects are jobs
        that processes which died held; in a crash storm the most returned of them are the
        nearest to the queue's delivery limit."""
        await self._slots.acquire(priority)

    def release(self) -> None:
        self._slots.release()

    async def run(self, job: JobRequest, auth: Auth | None, ctx: JobContext) -> Data:
        """The driver's data for `job`, run in a child of its own (hold a `slot()`).

        Raises the driver's `JobError`; `SandboxBugError` for any other exception in the
        driver; `WorkerCrashedError` when the child died without an answer;
        `SandboxUnavailableError` when the sandbox process cannot be started.
        """
        channel = await self._ensure_started()
        loop = asyncio.get_running_loop()
        self._next_tag += 1
        tag = self._next_tag
        request = _Request(
            tag=tag,
            job=job,
            auth=auth,
            timeout=ctx.remaining(),
            max_output_bytes=ctx.max_output_bytes,
            log_context=dict(structlog.contextvars.get_contextvars()),
        )
        answer: asyncio.Future[tuple[Any, ...]] = loop.create_future()
        self._pending[tag] = answer
        self.started += 1
        try:
            await channel.send(("run", request))
            reply = await answer
        except asyncio.CancelledError:
            # Past the job's deadline, or shutting down: the child goes with it.
            with contextlib.suppress(Exception):
                await channel.send(("kill", tag))
            raise
        finally:
            self._pending.pop(tag, None)
        return self._outcome(job, reply)

    def _outcome(self, job: JobRequest, reply: tuple[Any, ...]) -> Data:
        what = reply[0]
        if what == "ok":
            data: Data = reply[1]
            return data
        if what == "error":
            _, name, code, retryable, message, data = reply
            raise _job_error(name, code, retryable, message, data)
        if what == "bug":
            raise SandboxBugError(f"in the sandbox child: {reply[1]}")
        self.crashed += 1
        how = str(reply[1])
        log.warning("sandbox_child_died", job_id=job.id, how=how)
        raise WorkerCrashedError(how)

    async def _ensure_started(self) -> _Channel:
        if self._channel is not None:
            return self._channel
        async with self._start_lock:
            if self._channel is not None:
                return self._channel
            if self._closed:
                raise SandboxUnavailableError("the poller is shutting down")
            forked, self._forked = self._forked, None
            if forked is not None:
                channel = await _Channel.attach(forked)
                log.info("sandbox_started", pid=forked.pid, how="forked at start-up")
            elif time.monotonic() - self._failed_at < RETRY_START_AFTER:
                raise SandboxUnavailableError("the sandbox process failed to start recently")
            else:
                try:
                    channel = await self._spawn()
                except (OSError, TimeoutError, EOFError, pickle.UnpicklingError, ValueError) as exc:
                    self._failed_at = time.monotonic()
                    log.warning("sandbox_unavailable", error=repr(exc))
                    raise SandboxUnavailableError(repr(exc)) from None
            self._channel = channel
            self._reader = asyncio.create_task(self._read(channel), name="sandbox-reader")
            return channel

    async def _spawn(self) -> _Channel:
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "poller.sandbox",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # Out of the poller's process group: a SIGTERM/SIGINT sent to the group must not
            # kill it while it is still importing (before it ignores them); it goes when the
            # poller closes its stdin, or exits.
            start_new_session=True,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        channel = _Channel(proc.pid, proc.stdout, proc.stdin, proc)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await channel.send(("settings", self._settings))
                _check_ready(await _read_frame(proc.stdout))
        except BaseException:
            channel.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), CLOSE_TIMEOUT)
            raise
        start_ms = round((time.monotonic() - t0) * 1000)
        log.info("sandbox_started", pid=proc.pid, how="spawned", start_ms=start_ms)
        return channel

    async def _read(self, channel: _Channel) -> None:
        """Hand each answer to its job; when the sandbox process ends, fail the jobs left."""
        try:
            while True:
                message = await _read_frame(channel.reader)
                if not isinstance(message, tuple) or len(message) != 3:
                    continue
                what, tag, payload = message
                answer = self._pending.get(tag)
                if answer is None or answer.done():
                    continue
                if what == "done":
                    answer.set_result(pickle.loads(payload))  # noqa: S301 - our own child
                else:
                    answer.set_result(("died", payload))
        except (EOFError, asyncio.IncompleteReadError, pickle.UnpicklingError, ValueError):
            pass
        finally:
            if self._channel is channel:
                self._channel = None
            if not self._closed:
                log.warning("sandbox_process_ended", pid=channel.pid, jobs=len(self._pending))
                with contextlib.suppress(Exception):
                    await channel.close()
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_result(("died", "the sandbox process ended"))

    async def aclose(self) -> None:
        """Stop the sandbox process (its children with it)."""
        self._closed = True
        forked, self._forked = self._forked, None
        if forked is not None:
            channel = await _Channel.attach(forked)
        elif self._channel is not None:
            channel = self._channel
        else:
            return
        await channel.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def _check_ready(message: object) -> None:
    if not (isinstance(message, tuple) and message[:1] == ("ready",)):
        raise ValueError(f"unexpected first message {message!r:.80}")


async def _read_frame(stream: asyncio.StreamReader) -> object:
    header = await stream.readexactly(_HEADER.size)
    (size,) = _HEADER.unpack(header)
    return pickle.loads(await stream.readexactly(size))  # noqa: S301 - our own process


# ------------------------------------------------------------------------------------------
# The sandbox process (`python -m poller.sandbox`): synchronous, single-threaded, forks


@dataclass
class _Child:
    tag: int
    pid: int
    fd: int
    buffer: bytearray


class _Frames:
    """Splits a byte stream into frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[object]:
        self._buffer += chunk
        out: list[object] = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + size
            if len(self._buffer) < end:
                break
            out.append(pickle.loads(bytes(self._buffer[_HEADER.size : end])))  # noqa: S301
            del self._buffer[:end]
        return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)} without an answer"


def _preload(settings: PollerSettings) -> None:
    """Import every driver (and the SNMP backends) once, so that each child is a fork away."""
    from poller.drivers import driver_classes  # noqa: PLC0415 - the sandbox process only

    driver_classes()
    names = []
    if settings.snmp_backend in ("auto", "netsnmp"):
        names.append("poller.drivers.snmp_netsnmp")
        if settings.snmp_open_sessions:  # its library, loaded (not initialised) once
            names.append("netsnmpy._netsnmp")
    if settings.snmp_backend in ("auto", "pysnmp"):
        names.append("poller.drivers.snmp_pysnmp")
    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _ignore_stop_signals() -> None:
    # The poller decides when the sandbox process goes (it closes the pipe): a Ctrl-C or a
    # SIGTERM sent to the whole process group must not kill the suspect jobs it runs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Zygote:
    def __init__(self, inp: int, out: int, settings: PollerSettings) -> None:
        self.inp = inp
        self.out = out
        self.settings = settings
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, _Child] = {}  # by fd

    def serve(self, frames: _Frames) -> int:
        # Children collect garbage without touching (so copying) what was here at the fork.
        gc.freeze()
        self.selector.register(self.inp, selectors.EVENT_READ, None)
        while True:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data is None:
                    chunk = os.read(self.inp, 1 << 16)
                    if not chunk:
                        self._stop()
                        return 0
                    for message in frames.feed(chunk):
                        self._handle(message)
                else:
                    self._read_child(key.data)

    def _handle(self, message: object) -> None:
        if not isinstance(message, tuple) or len(message) != 2:
            return
        what, arg = message
        if what == "run" and isinstance(arg, _Request):
            self._fork(arg)
        elif what == "kill":
            for child in self.children.values():
                if child.tag == arg:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)

    def _fork(self, request: _Request) -> None:
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                os.close(read_fd)
                self._in_child(parent)
                asyncio.run(_run_job(self.settings, request, write_fd))
            finally:
                os._exit(code)
        os.close(write_fd)
        child = _Child(request.tag, pid, read_fd, bytearray())
        self.children[read_fd] = child
        self.selector.register(read_fd, selectors.EVENT_READ, child)

    def _in_child(self, parent: int) -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(71)  # the sandbox process died before the line above
        self.selector.close()
        for fd in (self.inp, self.out, *self.children):
            with contextlib.suppress(OSError):
                os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def _read_child(self, child: _Child) -> None:
        chunk = os.read(child.fd, 1 << 16)
        if chunk:
            child.buffer += chunk
            return
        self.selector.unregister(child.fd)
        os.close(child.fd)
        del self.children[child.fd]
        _, status = os.waitpid(child.pid, 0)
        size = len(child.buffer) - _HEADER.size
        complete = size >= 0 and _HEADER.unpack_from(child.buffer)[0] == size
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and complete:
            message: tuple[str, int, object] = (
                "done",
                child.tag,
                bytes(child.buffer[_HEADER.size :]),
            )
        else:
            message = ("died", child.tag, _describe(status))
        _write_all(self.out, _frame(message))

    def _stop(self) -> None:
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        for child in self.children.values():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)


async def _run_job(settings: PollerSettings, request: _Request, answer_fd: int) -> None:
    """In the child: run the job's driver, write the answer to `answer_fd` and exit at once
    (no event-loop teardown: a driver thread still blocked in a C call cannot hold it up)."""
    from poller.drivers import driver_classes  # noqa: PLC0415 - imported by the preload
    from poller.wire import JobKind  # noqa: PLC0415 - imported by the preload

    structlog.contextvars.bind_contextvars(**request.log_context)
    job = request.job
    reply: tuple[Any, ...]
    try:
        driver = driver_classes()[JobKind(job.kind)].from_settings(settings)
        loop = asyncio.get_running_loop()
        ctx = JobContext(  # guarded: run under the `timeout_at` below
            deadline=loop.time() + request.timeout,
            max_output_bytes=request.max_output_bytes,
            guarded=True,
        )
        testhooks.crash_on_job(job.id)  # test-only hook (poller/testhooks.py)
        async with asyncio.timeout_at(ctx.deadline):
            data = await driver.run(job, request.auth, ctx)
        reply = ("ok", data)
    except JobError as exc:
        reply = ("error", type(exc).__name__, exc.code, exc.retryable, exc.message, exc.data)
    except TimeoutError:
        message = f"no complete answer from {job.target.host} within {job.timeout:g} s"
        reply = ("error", "DeviceTimeoutError", "device_timeout", True, message, None)
    except Exception as exc:  # noqa: BLE001 - a bug: reported to the poller, which requeues
        reply = ("bug", "".join(traceback.format_exception_only(exc)).strip())
    _write_all(answer_fd, _frame(reply))
    os._exit(0)


def main() -> int:
    """The sandbox process: read the settings, import the drivers, fork a child per job."""
    from poller.logging import configure_logging  # noqa: PLC0415 - this process only

    _ignore_stop_signals()
    out = os.dup(1)
    os.dup2(2, 1)  # whatever a library prints goes to the log stream, not into the protocol
    frames = _Frames()
    settings: PollerSettings | None = None
    while settings is None:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return 0
        for message in frames.feed(chunk):
            if isinstance(message, tuple) and message[:1] == ("settings",):
                settings = message[1]
    configure_logging(settings.log_format, settings.log_level)
    _preload(settings)
    _write_all(out, _frame(("ready", os.getpid())))
    return _Zygote(0, out, settings).serve(frames)


if __name__ == "__main__":
    # Run as `poller.sandbox`, not `__main__`: the requests pickled by the poller name
    # `poller.sandbox._Request`.
    from poller.sandbox import main as _main

    sys.exit(_main())
