"""`poller` command line: run | check | exec | config show | --version.

Parses arguments and calls in; nothing more. Exit codes: 0 success (for `exec`: the job's status
is ok), 1 failure (for `exec`: an error result; for `check`: unhealthy), 2 a bad setting or
argument (one line on stderr naming it; for `exec`, after that kind's usage).

`exec` takes the job options of `poller.jobargs`, the same as `satellite call`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from poller import __version__, stopsignal

if TYPE_CHECKING:
    from poller.config import PollerSettings
    from poller.wire import JobRequest, JobResult

__all__ = ["main"]

EXEC_JOB_TIMEOUT = 10.0
"""`poller exec`'s default job deadline: someone is waiting at the terminal."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    if command in ("run", "lane"):
        # First of all: a SIGTERM while still starting is a requested stop (exit 0), not death.
        stopsignal.install()
    # Only now (pydantic, asyncio): a SIGTERM while they are imported is recorded already.
    from poller.errors import ConfigError  # noqa: PLC0415

    parser = _parser(with_exec_kinds=command == "exec")
    args, unknown = parser.parse_known_args(argv)
    # The parser of the command (an `exec` kind) names what it does not know, with its usage.
    leaf: argparse.ArgumentParser = getattr(args, "parser", parser)
    if unknown:
        leaf.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"poller: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `poller exec snmp.walk ... | head`: the reader went away
        with contextlib.suppress(OSError, ValueError):  # the last flush must not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE
    return code


def _command_of(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _parser(*, with_exec_kinds: bool = True) -> argparse.ArgumentParser:
    """The parser; `exec`'s kinds (and the wire models they import) only when needed."""
    parser = argparse.ArgumentParser(
        prog="poller",
        description="Satellite poller: takes network jobs from RabbitMQ and runs them.",
    )
    parser.add_argument("--version", action="version", version=f"poller {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="consume this satellite's job queue (the container command)")
    run.set_defaults(func=_cmd_run)

    # `poller run` starts it (USM_POLLER_INTERACTIVE_PROCESS, on by default; poller/laneproc.py);
    # not for people, so not in the help.
    lane = sub.add_parser("lane")
    lane.add_argument("--control-fd", type=int, required=True)
    lane.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="health probe: exit 0 while connected and consuming")
    check.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    check.set_defaults(func=_cmd_check)

    config = sub.add_parser("config", help="inspect the settings")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the effective settings, secrets masked")
    show.add_argument("--json", action="store_true", help="JSON instead of a table")
    show.set_defaults(func=_cmd_config_show)

    exec_ = sub.add_parser(
        "exec",
        help="run one job locally (no broker) and print the result JSON",
        description="Run one job against a device from this machine, like zabbix_get.",
        epilog="the options of a kind: poller exec KIND --help",
    )
    if with_exec_kinds:
        _add_exec_arguments(exec_)
    exec_.set_defaults(func=_cmd_exec)
    return parser


# ---------------------------------------------------------------------------- run / check


def _cmd_run(args: argparse.Namespace) -> int:
    end = end_after_exit_handlers()  # first: its handler then runs after every other one
    stopsignal.install()  # (again: `main` installs it for `run` already; a caller may not)
    from poller import testhooks  # noqa: PLC0415 - standard library only

    testhooks.hold_start("imports")
    import asyncio  # noqa: PLC0415 - see `main`

    from poller.config import load_settings  # noqa: PLC0415 - keeps `--version` fast
    from poller.logging import configure_logging  # noqa: PLC0415
    from poller.sandbox import close_forked, fork_sandbox  # noqa: PLC0415
    from poller.worker import run_worker, stopped_while_starting  # noqa: PLC0415

    lane_fd: int | None = getattr(args, "control_fd", None)
    if lane_fd is not None:
        from poller.laneproc import LaneLink  # noqa: PLC0415

        if not LaneLink.usable(lane_fd):
            print(
                f"poller: --control-fd {lane_fd} is not an open socket (`poller lane` is started"
                " by `poller run`, unless USM_POLLER_INTERACTIVE_PROCESS=false)",
                file=sys.stderr,
            )
            return 2
        LaneLink.die_with_parent()
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    if lane_fd is None:  # a lane process has its replica's environment: said once, there
        _warn_unknown_variables()
    if stopsignal.requested():
        return end(stopped_while_starting(settings, "settings"))
    # Before the event loop and any thread: the sandbox process for suspect jobs is a fork.
    forked = fork_sandbox(settings) if settings.sandbox_slots else None
    testhooks.hold_start("sandbox")
    if stopsignal.requested():
        if forked is not None:
            close_forked(forked)
        return end(stopped_while_starting(settings, "sandbox"))
    # The event loop's own handlers take over in `Worker.run`, which honours a request
    # recorded until then.
    return end(asyncio.run(run_worker(settings, forked=forked, lane_fd=lane_fd)))


def end_after_exit_handlers() -> Callable[[int], int]:
    """Make the process end with the code given to the returned function once the `atexit`
    handlers have run, skipping the rest of the interpreter's finalization.

    A blocking SNMP call abandoned by a timed-out job keeps its (daemon) thread in Net-SNMP
    until Net-SNMP's own timeout. Past the exit handlers, a daemon thread that comes back to
    Python is ended with `pthread_exit` inside ezsnmp's C++ frames, and the process aborts
    ("terminate called without an active exception", exit 134) instead of exiting with the
    drained worker's code. By then every job is answered or returned and the broker connection
    is closed: nothing is left to finalize. Call it before anything registers an exit handler.
    """
    codes: list[int] = []

    def end() -> None:
        if codes:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(codes[0])

    def record(code: int) -> int:
        codes.append(code)
        return code

    atexit.register(end)
    return record


def _warn_unknown_variables(*, to_stderr: bool = False) -> None:
    """One warning per `USM_POLLER_*` variable no setting reads: a log line, or a stderr line."""
    from poller.config import unknown_variables  # noqa: PLC0415
    from poller.logging import get_logger  # noqa: PLC0415

    for unknown in unknown_variables():
        if to_stderr:
            print(f"poller: warning: {unknown.message()}", file=sys.stderr)
        else:
            get_logger("poller.config").warning(
                "unknown_setting_ignored", variable=unknown.name, did_you_mean=unknown.suggestion
            )


def _cmd_check(args: argparse.Namespace) -> int:
    from poller.health import check, health_path_from_env  # noqa: PLC0415

    healthy, reason = check(health_path_from_env())
    if not args.quiet:
        print(reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def _cmd_config_show(args: argparse.Namespace) -> int:
    from poller.config import load_settings  # noqa: PLC0415

    view = load_settings().public_view()
    _warn_unknown_variables(to_stderr=True)  # after a failed load, its one line says it all
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        width = max(len(k) for k in view)
        for key, value in view.items():
            print(f"{key:<{width}}  {'-' if value is None else value}")
    return 0


# ---------------------------------------------------------------------------- exec


def _add_exec_arguments(exec_: argparse.ArgumentParser) -> None:
    from poller.jobargs import KIND_OPTIONS, add_job_arguments  # noqa: PLC0415 - see _parser

    kinds = exec_.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, options in KIND_OPTIONS.items():
        p = kinds.add_parser(
            kind.value, help=options.help, description=options.help, allow_abbrev=False
        )
        add_job_arguments(p, job_timeout_default=EXEC_JOB_TIMEOUT)
        # The spelling before `--job-timeout` (satellite's `--timeout` is how long to wait).
        p.add_argument(
            "--timeout",
            dest="job_timeout",
            type=float,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
        options.add_arguments(p)
        p.add_argument(
            "--json", action="store_true", help="print the result on one line (default: indented)"
        )
        p.set_defaults(parser=p)


def build_exec_job(args: argparse.Namespace) -> dict[str, Any]:
    """The job message (as a dict) that `poller exec` runs."""
    from poller.jobargs import job_body  # noqa: PLC0415 - see _parser

    return job_body(args.kind, args, os.environ)


def _cmd_exec(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see `main`

    from poller import wire  # noqa: PLC0415
    from poller.config import DSN_ALIASES, load_settings  # noqa: PLC0415
    from poller.errors import ConfigError, WireError  # noqa: PLC0415
    from poller.logging import configure_logging  # noqa: PLC0415

    try:
        job = wire.decode_job(json.dumps(build_exec_job(args)).encode())
    except WireError as exc:
        raise ConfigError(exc.message) from None
    # exec needs no broker: the two deployment settings get harmless defaults.
    defaults: dict[str, Any] = {"satellite_id": "local"}
    if not any(os.environ.get(name) for name in DSN_ALIASES):
        defaults["amqp_dsn"] = "amqp://localhost/"
    settings = load_settings(defaults)
    configure_logging(settings.log_format, settings.log_level)
    result = asyncio.run(_exec(settings, job))
    indent = None if args.json else 2
    print(json.dumps(json.loads(wire.encode(result)), indent=indent, ensure_ascii=False))
    return 0 if result.status == "ok" else 1


async def _exec(settings: PollerSettings, job: JobRequest) -> JobResult:
    from poller.credentials import CredentialStore  # noqa: PLC0415
    from poller.drivers import build_drivers  # noqa: PLC0415
    from poller.runner import Runner  # noqa: PLC0415

    drivers = build_drivers(settings, kinds={job.kind})
    runner = Runner(
        drivers=drivers,
        credentials=CredentialStore.load(settings.credentials_file),
        satellite_id=settings.satellite_id,
        worker=f"exec-{os.getpid()}",
        per_device_concurrency=settings.per_device_concurrency,
        max_output_bytes=settings.max_output_bytes,
    )
    try:
        return await runner.run(job)
    finally:
        for driver in {id(d): d for d in drivers.values()}.values():
            await driver.aclose()
