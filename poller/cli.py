"""`poller` command line: run | check | exec | config show | --version.

Parses arguments and calls in; nothing more. Exit codes: 0 success (for `exec`: the job's status
is ok), 1 failure (for `exec`: an error result; for `check`: unhealthy), 2 a bad setting or
argument (one line on stderr naming it).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poller import __version__
from poller.errors import ConfigError, WireError

if TYPE_CHECKING:
    from poller.config import PollerSettings
    from poller.wire import JobRequest, JobResult

__all__ = ["main"]

SNMP_KINDS = ("snmp.get", "snmp.getnext", "snmp.walk", "snmp.set")
CLI_KINDS = ("ssh.exec", "ssh.cli", "telnet.cli")
ALL_KINDS = (*SNMP_KINDS, *CLI_KINDS, "icmp.ping", "tcp.connect")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"poller: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poller",
        description="Satellite poller: takes network jobs from RabbitMQ and runs them.",
    )
    parser.add_argument("--version", action="version", version=f"poller {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="consume this satellite's job queue (the container command)")
    run.set_defaults(func=_cmd_run)

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
    )
    _add_exec_arguments(exec_)
    exec_.set_defaults(func=_cmd_exec)
    return parser


# ---------------------------------------------------------------------------- run / check


def _cmd_run(_args: argparse.Namespace) -> int:
    end = end_after_exit_handlers()  # first: its handler then runs after every other one
    from poller.config import load_settings  # noqa: PLC0415 - keeps `--version` fast
    from poller.logging import configure_logging  # noqa: PLC0415
    from poller.worker import run_worker  # noqa: PLC0415

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    _warn_unknown_variables()
    return end(asyncio.run(run_worker(settings)))


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
    kinds = exec_.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in ALL_KINDS:
        p = kinds.add_parser(kind, help=_KIND_HELP[kind])
        p.add_argument("--host", required=True, help="device address or name")
        p.add_argument(
            "--port",
            type=int,
            required=kind == "tcp.connect",
            help="device port (161 for SNMP, 22 SSH, 23 telnet)",
        )
        p.add_argument("--timeout", type=float, default=10.0, help="whole-job deadline, s (10)")
        p.add_argument("--id", help="job id (a random UUID by default)")
        if kind in SNMP_KINDS or kind in CLI_KINDS:
            p.add_argument("--credential-ref", help="entry of USM_POLLER_CREDENTIALS_FILE")
        if kind in SNMP_KINDS:
            _add_snmp_arguments(p, kind)
        elif kind in CLI_KINDS:
            _add_cli_arguments(p, kind)
        elif kind == "icmp.ping":
            p.add_argument("--count", type=int, help="echo requests (3)")
            p.add_argument("--interval", type=float, help="seconds between them (0.2)")
            p.add_argument("--size", type=int, help="payload bytes (56)")


_KIND_HELP = {
    "snmp.get": "SNMP GET of OIDs",
    "snmp.getnext": "SNMP GETNEXT of OIDs",
    "snmp.walk": "SNMP walk of subtrees",
    "snmp.set": "SNMP SET of OID=TYPE:VALUE",
    "ssh.exec": "commands over SSH exec channels",
    "ssh.cli": "commands in an interactive SSH CLI session",
    "telnet.cli": "commands in an interactive telnet CLI session",
    "icmp.ping": "ICMP echo",
    "tcp.connect": "TCP connect to --port",
}


def _add_snmp_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    if kind == "snmp.set":
        p.add_argument("items", nargs="+", metavar="OID=TYPE:VALUE", help="varbinds to set")
    else:
        p.add_argument("items", nargs="+", metavar="OID", help="numeric OIDs")
    snmp = p.add_argument_group("SNMP")
    snmp.add_argument("-v", "--snmp-version", choices=("1", "2c", "3"), default="2c")
    snmp.add_argument("-c", "--community", help="v1/v2c community (or --community-file)")
    snmp.add_argument("--community-file", type=Path)
    snmp.add_argument("-u", "--user", help="v3 user name")
    snmp.add_argument("-l", "--security-level", choices=("noAuthNoPriv", "authNoPriv", "authPriv"))
    snmp.add_argument(
        "-a", "--auth-protocol", choices=("MD5", "SHA", "SHA224", "SHA256", "SHA384", "SHA512")
    )
    snmp.add_argument("-A", "--auth-key", help="v3 auth passphrase (or --auth-key-file)")
    snmp.add_argument("--auth-key-file", type=Path)
    snmp.add_argument("-x", "--priv-protocol", choices=("DES", "AES", "AES192", "AES256"))
    snmp.add_argument("-X", "--priv-key", help="v3 privacy passphrase (or --priv-key-file)")
    snmp.add_argument("--priv-key-file", type=Path)
    snmp.add_argument("-n", "--context", default="", help="v3 context name")
    if kind == "snmp.walk":
        snmp.add_argument("--max-repetitions", type=int, help="GETBULK max-repetitions (25)")
        snmp.add_argument("--max-varbinds", type=int, help="stop after this many (200000)")


def _add_cli_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    cli = p.add_argument_group("SSH and telnet")
    cli.add_argument("--username")
    cli.add_argument("--password-file", type=Path, help="file holding the password")
    cli.add_argument("--enable-password-file", type=Path, help="file holding the enable secret")
    if kind.startswith("ssh."):
        cli.add_argument("--private-key-file", type=Path)
        cli.add_argument("--host-key", help="pinned OpenSSH public key of the device")
    if kind != "ssh.exec":
        cli.add_argument("--platform", default="generic", help="generic, cisco_ios, ...")
        cli.add_argument("--enable", action="store_true", help="enter privileged mode first")
    cli.add_argument(
        "--command",
        action="append",
        required=True,
        dest="commands",
        help="a command to run (repeatable)",
    )


def _secret(value: str | None, path: Path | None, what: str) -> str | None:
    if path is None:
        return value
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"--{what}-file: cannot read {path}: {exc.strerror}") from None


def _set_varbind(item: str) -> dict[str, Any]:
    oid, sep, rest = item.partition("=")
    type_, sep2, value = rest.partition(":")
    if not sep or not sep2:
        raise ConfigError(f"snmp.set varbind {oid!r}: write OID=TYPE:VALUE")
    numeric = type_ in ("Integer", "Counter32", "Gauge32", "TimeTicks", "Counter64", "Unsigned32")
    if numeric:
        try:
            return {"oid": oid, "type": type_, "value": int(value)}
        except ValueError:
            raise ConfigError(f"snmp.set varbind {oid}: {type_} needs a whole number") from None
    return {"oid": oid, "type": type_, "value": value}


def _snmp_auth(args: argparse.Namespace) -> dict[str, Any]:
    auth: dict[str, Any] = {"version": args.snmp_version}
    if args.snmp_version in ("1", "2c"):
        auth["community"] = _secret(args.community, args.community_file, "community")
        return auth
    auth |= {
        "user": args.user,
        "security_level": args.security_level,
        "auth_protocol": args.auth_protocol,
        "auth_key": _secret(args.auth_key, args.auth_key_file, "auth-key"),
        "priv_protocol": args.priv_protocol,
        "priv_key": _secret(args.priv_key, args.priv_key_file, "priv-key"),
        "context": args.context,
    }
    return {k: v for k, v in auth.items() if v is not None}


def _cli_auth(args: argparse.Namespace) -> dict[str, Any]:
    auth = {
        "username": args.username,
        "password": _secret(None, args.password_file, "password"),
        "private_key": _secret(None, getattr(args, "private_key_file", None), "private-key"),
        "enable_password": _secret(None, args.enable_password_file, "enable-password"),
        "host_key": getattr(args, "host_key", None),
    }
    return {k: v for k, v in auth.items() if v is not None}


def _params(args: argparse.Namespace) -> dict[str, Any]:
    kind = args.kind
    if kind == "snmp.set":
        return {"varbinds": [_set_varbind(item) for item in args.items]}
    if kind in SNMP_KINDS:
        params: dict[str, Any] = {"oids": list(args.items)}
        if kind == "snmp.walk":
            if args.max_repetitions is not None:
                params["max_repetitions"] = args.max_repetitions
            if args.max_varbinds is not None:
                params["max_varbinds"] = args.max_varbinds
        return params
    if kind == "ssh.exec":
        return {"commands": args.commands}
    if kind in CLI_KINDS:
        return {"platform": args.platform, "commands": args.commands, "enable": args.enable}
    if kind == "tcp.connect":
        return {"port": args.port}
    options = {"count": args.count, "interval": args.interval, "size": args.size}
    return {k: v for k, v in options.items() if v is not None}


def build_exec_job(args: argparse.Namespace) -> dict[str, Any]:
    """The job message (as a dict) that `poller exec` runs."""
    job: dict[str, Any] = {
        "v": 1,
        "id": args.id or str(uuid.uuid4()),
        "kind": args.kind,
        "target": {"host": args.host, "port": args.port},
        "timeout": args.timeout,
        "params": _params(args),
    }
    if getattr(args, "credential_ref", None):
        job["credential_ref"] = args.credential_ref
    elif args.kind in SNMP_KINDS:
        job["auth"] = _snmp_auth(args)
    elif args.kind in CLI_KINDS:
        job["auth"] = _cli_auth(args)
    return job


def _cmd_exec(args: argparse.Namespace) -> int:
    from poller import wire  # noqa: PLC0415
    from poller.config import DSN_ALIASES, load_settings  # noqa: PLC0415
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
    print(json.dumps(json.loads(wire.encode(result)), indent=2, ensure_ascii=False))
    return 0 if result.status == "ok" else 1


async def _exec(settings: PollerSettings, job: JobRequest) -> JobResult:
    from poller.credentials import CredentialStore  # noqa: PLC0415
    from poller.drivers import build_drivers  # noqa: PLC0415
    from poller.runner import Runner  # noqa: PLC0415

    drivers = build_drivers(settings)
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
