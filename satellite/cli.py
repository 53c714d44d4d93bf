"""`satellite`: the core-side command line. Parses arguments, calls `Client`, prints.

Exit codes (stable, documented in docs/core.md):

- 0: done (`call`: the result's status is `ok`; `status`: every satellite is healthy)
- 1: `call`: the result's status is `error`; `declare`: some object exists with other
  arguments; `status`: some satellite has no consumer, no heartbeat or a growing queue;
  `submit --file`, `dlq replay`: some job was not taken; `dlq show`: no such job; `dlq`,
  `results`: the queue was never declared
- 2: a bad argument or setting (one line on stderr)
- 3: `call`: no result within `--timeout`
- 4: the broker or its management API is unreachable or refused (or did not take the job);
  with `--api`: the core API is unreachable, refused the token, or cannot publish now
- 130: interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from amqp.exceptions import AMQPError  # type: ignore[import-untyped]
from kombu.exceptions import KombuError

from poller import wire
from poller.errors import BrokerError, ConfigError
from poller.wire import JobKind, JobRequest, JobResult, interactive_queue, validate_satellite_id
from satellite import __version__, render
from satellite.apiclient import (
    API_ENV,
    MAX_BATCH_JOBS,
    MAX_WAIT_SECONDS,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ApiClient,
    ApiError,
    ApiProblem,
    parse_addresses,
    resolve_token,
)
from satellite.bulk import DEFAULT_WINDOW, BulkReport, open_jobs_file
from satellite.client import CALL_MARGIN_SECONDS, Client
from satellite.config import DSN_ENV, CoreSettings, load_core_settings
from satellite.dispatch import InvalidJobError, NoResultError, SenderPolicy
from satellite.jobargs import KIND_OPTIONS, add_job_arguments, job_from_args
from satellite.management import (
    MANAGEMENT_ENV,
    ManagementApi,
    ManagementError,
    ManagementSettings,
)
from satellite.provision import (
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_CONNECTIONS,
    provision_satellite,
    revoke_satellite,
)
from satellite.service.tokens import (
    DEFAULT_STATE_DIR,
    SCOPES,
    STATE_DIR_ENV,
    TOKENS_ENV,
    TokensFile,
    default_tokens_path,
)
from satellite.status import FleetView, SatelliteStatus, satellite_status
from satellite.topology import DeclareReport, NotDeclaredError, Outcome, core_topology

if TYPE_CHECKING:
    from satellite.service.settings import DatabaseUrl

__all__ = ["EXIT_BROKER", "EXIT_ERROR", "EXIT_NO_RESULT", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_RESULT = 3
EXIT_BROKER = 4
EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141  # as a process killed by SIGPIPE: `| head` took what it wanted

TRUSTED_USERS_ENV = "USM_TRUSTED_USERS"
JOB_QUEUE_PREFIX = "usm_poller-sat-"
DLQ_SUFFIX = ".dlq"
DEFAULT_LISTEN = 12.0
"""Seconds `status` listens for heartbeats: a little more than the default interval (10 s)."""

#: Options every command has; their defaults are filled in after parsing (see `_Parser`).
COMMON_DEFAULTS: dict[str, Any] = {
    "dsn": None,
    "connect_timeout": None,
    "operation_timeout": None,
    "management_url": None,
    "trust_user": [],
    "json": False,
    "api": None,
    "token_file": None,
}


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line (exit code 2), without abbreviations.

    Abbreviations are off so that, for example, `--password x` is an error rather than
    `--password-file x`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _common_options() -> _Parser:
    # Defaults are SUPPRESSed so that a subcommand's parser does not overwrite an option given
    # before its name (argparse copies every default of a sub-parser onto the namespace).
    common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    broker = common.add_argument_group("broker")
    broker.add_argument(
        "--dsn", help=f"broker URL(s), comma-separated for failover (default: ${DSN_ENV})"
    )
    broker.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help="give up connecting after S seconds, all nodes and retries included (10)",
    )
    broker.add_argument(
        "--operation-timeout",
        type=float,
        metavar="S",
        help="per broker round trip or HTTP request (10)",
    )
    broker.add_argument(
        "--management-url",
        metavar="URL",
        help=f"RabbitMQ management API (default: ${MANAGEMENT_ENV}, else http://<DSN host>:15672"
        " with the DSN's user)",
    )
    broker.add_argument(
        "--trust-user",
        action="append",
        metavar="USER",
        help="also accept results and heartbeats sent by this broker user for any satellite "
        f"(repeatable; also ${TRUSTED_USERS_ENV}, comma-separated; '*' trusts everyone)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="satellite", description="Core-side toolkit of the satellite poller.")
    parser.add_argument("--version", action="version", version=f"satellite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()

    declare = commands.add_parser(
        "declare", parents=[common], help="declare exchanges and queues for satellites"
    )
    declare.add_argument("satellite_ids", nargs="+", metavar="ID")
    declare.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    declare.add_argument(
        "--no-results-queue",
        dest="results_queue",
        action="store_false",
        help="do not declare the core's usm_poller.results queue",
    )
    declare.set_defaults(handler=_declare, prepare=_prepare_ids)

    _add_provision(commands, common)
    _add_jobs(commands, common)
    _add_results(commands, common)
    _add_status(commands, common)
    _add_dlq(commands, common)
    _add_token(commands)
    _add_serve(commands)
    _add_store(commands)
    _add_history(commands, common)
    _add_schedule(commands, common)
    _add_alerts(commands, common)
    return parser


def _add_provision(commands: Any, common: _Parser) -> None:
    provision = commands.add_parser(
        "provision",
        parents=[common],
        help="create a satellite's broker user (or rotate its password); print its DSN",
    )
    provision.add_argument("satellite_ids", nargs=1, metavar="ID")
    provision.add_argument("--tls", action="store_true", help="give an amqps:// DSN (port 5671)")
    provision.add_argument("--rotate", action="store_true", help="set a new password")
    provision.add_argument(
        "--disconnect",
        action="store_true",
        help="with --rotate: close the user's open connections now",
    )
    provision.add_argument(
        "--broker-host", metavar="HOST", help="host in the DSN (default: the core's DSN host)"
    )
    provision.add_argument("--broker-port", type=int, metavar="P", help="port in the DSN")
    provision.add_argument(
        "--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N"
    )
    provision.add_argument(
        "--max-channels",
        type=int,
        default=DEFAULT_MAX_CHANNELS,
        metavar="N",
        help="over all of the user's connections",
    )
    provision.set_defaults(handler=_provision, prepare=_prepare_ids, needs_management=True)

    revoke = commands.add_parser(
        "revoke", parents=[common], help="delete a satellite's broker user (closes its connections)"
    )
    revoke.add_argument("satellite_ids", nargs=1, metavar="ID")
    revoke.set_defaults(handler=_revoke, prepare=_prepare_ids, needs_management=True)


def _add_jobs(commands: Any, common: _Parser) -> None:
    priority_help = "AMQP priority (overtakes nothing on quorum queues: use the lane)"
    submit_opts = _Parser(add_help=False)
    submit_opts.add_argument(
        "--priority", type=int, choices=range(10), metavar="0-9", help=priority_help
    )
    submit_opts.add_argument(
        "--expiration", type=float, metavar="S", help="drop the job if not taken within S seconds"
    )
    submit_opts.add_argument(
        "--interactive",
        dest="lane",
        action="store_const",
        const="interactive",
        default="bulk",
        help="send it to the satellite's interactive lane, ahead of the bulk backlog",
    )
    call_opts = _Parser(add_help=False)
    call_opts.add_argument(
        "--priority", type=int, choices=range(10), metavar="0-9", help=priority_help
    )
    call_opts.add_argument(
        "--bulk",
        dest="lane",
        action="store_const",
        const="bulk",
        default="interactive",
        help="send it to the bulk job queue instead of the interactive lane",
    )
    call_opts.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds to wait for the result (default: the job's timeout + 10)",
    )
    api_handlers = {"submit": _submit_api, "call": _call_api}
    for name, handler, extra, text in (
        ("submit", _submit, submit_opts, "publish jobs (one, or --file) and print their ids"),
        ("call", _call, call_opts, "publish one job and wait for its result"),
    ):
        parents = [common, API_OPTIONS] if name == "submit" else []
        sub = commands.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}.",
            # The job's options (and --timeout, --bulk, ...) belong to each kind's parser.
            epilog=f"the job options of a kind: satellite {name} ID KIND --help",
            parents=parents,
        )
        sub.add_argument("satellite_id", metavar="ID", type=_satellite_id_not_kind(name))
        if name == "submit":
            sub.add_argument(
                "--file",
                metavar="JOBS.jsonl",
                help="submit every job of this file (one JSON job per line; - for stdin)",
            )
            sub.add_argument(
                "--window",
                type=int,
                default=DEFAULT_WINDOW,
                metavar="N",
                help=f"unconfirmed jobs in flight at most ({DEFAULT_WINDOW})",
            )
            sub.add_argument(
                "--no-progress", dest="progress", action="store_false", help="no progress bar"
            )
        kinds = sub.add_subparsers(dest="kind", metavar="KIND", required=name == "call")
        for kind, options in KIND_OPTIONS.items():
            kind_parser = kinds.add_parser(
                kind.value,
                parents=[common, API_OPTIONS, extra],
                help=options.help,
                description=options.help,
            )
            add_job_arguments(kind_parser)
            options.add_arguments(kind_parser)
            kind_parser.set_defaults(parser=kind_parser)
        sub.set_defaults(handler=handler, prepare=_prepare_job, api_handler=api_handlers[name])


def _satellite_id_not_kind(command: str) -> Callable[[str], str]:
    """The ID argument's type: a job kind there means the satellite ID was forgotten."""
    kinds = {kind.value for kind in JobKind}

    def check(text: str) -> str:
        if text in kinds:
            raise argparse.ArgumentTypeError(
                f"{text!r} is a job kind, but the first argument is the satellite ID: "
                f"satellite {command} ID {text} ..."
            )
        return text

    return check


def _add_results(commands: Any, common: _Parser) -> None:
    results = commands.add_parser(
        "results", parents=[common], help="print results from the core's result queue, once each"
    )
    results.add_argument(
        "--follow", "-f", action="store_true", help="keep waiting for new results (Ctrl-C stops)"
    )
    results.add_argument(
        "--satellite",
        action="append",
        metavar="ID",
        dest="satellites",
        help="only this satellite's results (repeatable); others stay in the queue",
    )
    results.add_argument(
        "--for", dest="duration", type=float, metavar="S", help="with --follow: stop after S s"
    )
    results.set_defaults(handler=_results, prepare=_prepare_results)


def _add_status(commands: Any, common: _Parser) -> None:
    status = commands.add_parser(
        "status",
        parents=[common, API_OPTIONS],
        help="queues, replicas, heartbeats and replica advice",
    )
    status.add_argument("satellite_ids", nargs="*", metavar="ID", help="default: every satellite")
    status.add_argument(
        "--listen",
        type=float,
        default=DEFAULT_LISTEN,
        metavar="S",
        help=f"seconds to collect heartbeats ({DEFAULT_LISTEN:g}; more than the poller's "
        "USM_POLLER_HEARTBEAT_INTERVAL)",
    )
    status.add_argument(
        "--watch",
        nargs="?",
        const=5.0,
        type=float,
        metavar="S",
        help="refresh every S seconds (5) until Ctrl-C",
    )
    status.set_defaults(
        handler=_status, prepare=_prepare_ids, api_handler=_status_api, needs_management=True
    )


def _add_dlq(commands: Any, common: _Parser) -> None:
    dlq = commands.add_parser("dlq", help="dead-lettered jobs of a satellite")
    actions = dlq.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[common], help="list dead-lettered jobs")
    listing.add_argument("satellite_ids", nargs=1, metavar="ID")
    listing.set_defaults(handler=_dlq_list)
    show = actions.add_parser("show", parents=[common], help="one dead letter, secrets masked")
    show.add_argument("satellite_ids", nargs=1, metavar="ID")
    show.add_argument("job_id", metavar="JOB_ID")
    show.set_defaults(handler=_dlq_show)
    replay = actions.add_parser(
        "replay", parents=[common], help="publish dead letters to the job queue again"
    )
    replay.add_argument("satellite_ids", nargs=1, metavar="ID")
    replay.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    replay.set_defaults(handler=_dlq_replay)
    purge = actions.add_parser("purge", parents=[common], help="delete every dead letter")
    purge.add_argument("satellite_ids", nargs=1, metavar="ID")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask")
    purge.set_defaults(handler=_dlq_purge)
    dlq.set_defaults(prepare=_prepare_ids)


# ------------------------------------------------------------------------------------ running


class Context:
    """What a command needs, made on first use: settings, a broker client, the management API."""

    def __init__(self, args: argparse.Namespace, environ: dict[str, str]) -> None:
        self.args = args
        self.environ = environ
        self._client: Client | None = None
        self._api: ManagementApi | None = None
        self._core_api: ApiClient | None = None
        self._core_api_resolved = False

    @cached_property
    def settings(self) -> CoreSettings:
        return load_core_settings(
            self.args.dsn,
            environ=self.environ,
            connect_timeout=self.args.connect_timeout,
            operation_timeout=self.args.operation_timeout,
        )

    @cached_property
    def sender_policy(self) -> SenderPolicy:
        env = [u.strip() for u in self.environ.get(TRUSTED_USERS_ENV, "").split(",")]
        return SenderPolicy.trusting(self.settings.username, *self.args.trust_user, *env)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.settings, sender_check=self.sender_policy).connect()
        return self._client

    @property
    def api(self) -> ManagementApi:
        if self._api is None:
            management = ManagementSettings.resolve(
                self.settings,
                self.args.management_url,
                environ=self.environ,
                timeout=self.args.operation_timeout,
            )
            self._api = ManagementApi(management)
        return self._api

    @property
    def core_api(self) -> ApiClient | None:
        """The core service's API client when `--api` or `USM_CORE_API` is set, else None."""
        if not self._core_api_resolved:
            self._core_api_resolved = True
            self._core_api = _core_api_client(self.args, self.environ)
        return self._core_api

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._api is not None:
            self._api.close()
        if self._core_api is not None:
            self._core_api.close()


Handler = Callable[[argparse.Namespace, Context], int]
Prepare = Callable[[argparse.Namespace], None]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="satellite: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser (`satellite call ID snmp.get: error: ...`)
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    for name, default in COMMON_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    handler: Handler = args.handler
    prepare: Prepare = args.prepare
    context = Context(args, dict(os.environ))
    try:
        prepare(args)  # every argument is checked before connecting
        if getattr(args, "api_handler", None) is not None and context.core_api is not None:
            handler = args.api_handler  # through the core service's HTTP API (--api)
        elif getattr(args, "needs_broker", True):
            context.settings  # noqa: B018 - a bad DSN is a usage error before anything else
            if getattr(args, "needs_management", False):
                context.api  # noqa: B018 - so is a bad USM_MANAGEMENT_URL (no request yet)
        return handler(args, context)
    except (ConfigError, InvalidJobError, NoResultError, NotDeclaredError, BrokerError) as exc:
        return _failed(args, exc)
    except ApiError as exc:
        return _api_failed(args, exc)
    except (AMQPError, KombuError) as exc:
        # A refusal no command expected (a missing object, a permission): one line, not a trace.
        text = _mask_secrets(context, str(getattr(exc, "reply_text", "") or exc))
        return _fail(args, EXIT_BROKER, "broker", f"the broker refused: {text}")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _stdout_closed()
    finally:
        context.close()


def _stdout_closed() -> int:
    """The reader of stdout went away (`satellite results --json | head`): no traceback, and
    nothing more written (the interpreter's last flush would raise again); what was not printed
    was not acknowledged either."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_STDOUT_CLOSED


def _failed(args: argparse.Namespace, exc: Exception) -> int:
    """The exit code and `--json` error code of an expected failure (docs/core.md)."""
    if isinstance(exc, ConfigError | InvalidJobError):
        return _fail(args, EXIT_USAGE, "usage", str(exc))
    if isinstance(exc, NoResultError):
        return _fail(args, EXIT_NO_RESULT, "no_result", str(exc), job_id=exc.job_id)
    if isinstance(exc, NotDeclaredError):
        return _fail(args, EXIT_ERROR, "not_found", str(exc))
    kind = "management" if isinstance(exc, ManagementError) else "broker"
    return _fail(args, EXIT_BROKER, kind, str(exc))  # our messages never hold a password


def _mask_secrets(context: Context, text: str) -> str:
    try:
        return context.settings.scrub(text)
    except ConfigError:
        return text


def _fail(args: argparse.Namespace, code: int, kind: str, message: str, **extra: str) -> int:
    """One line on stderr; with --json also `{"ok": false, "error": {"code": kind, ...}}`.

    `kind` is one of the codes docs/core.md lists: usage, no_result, broker, management,
    not_found.
    """
    print(f"satellite: {message}", file=sys.stderr)
    if args.json:
        _print_json({"ok": False, "error": {"code": kind, "message": message, **extra}})
    return code


def _print_json(value: Any, out: TextIO | None = None, *, indent: int | None = None) -> None:
    print(json.dumps(value, indent=indent), file=out or sys.stdout, flush=True)


# ------------------------------------------------------------------------------------ commands


def _prepare_ids(args: argparse.Namespace) -> None:
    try:
        core_topology(args.satellite_ids)
    except ValueError as exc:
        raise ConfigError(f"ID {exc}") from None


def _declare(args: argparse.Namespace, ctx: Context) -> int:
    report = ctx.client.declare(
        args.satellite_ids,
        queue_type=args.queue_type,
        include_results_queue=args.results_queue,
    )
    if args.json:
        _print_json(report.as_dict())
    else:
        _print_report(report)
    return EXIT_OK if report.ok else EXIT_ERROR


def _print_report(report: DeclareReport) -> None:
    for item in report.items:
        line = f"{item.outcome.value:<9} {item.object:<9} {item.name}"
        if item.messages is not None:
            line += f"  ({item.messages} messages, {item.consumers} consumers)"
        print(line)
        if item.outcome is Outcome.CONFLICT:
            print(f"          kept as it is: {item.detail}")
    if not report.ok:
        print(
            f"{len(report.conflicts)} object(s) exist with other arguments and were left as "
            "they are; delete them to recreate, or match --queue-type",
            file=sys.stderr,
        )


def _provision(args: argparse.Namespace, ctx: Context) -> int:
    if args.disconnect and not args.rotate:
        raise ConfigError("--disconnect: only with --rotate")
    for name in ("max_connections", "max_channels"):
        if not 1 <= getattr(args, name) <= 100_000:
            raise ConfigError(f"--{name.replace('_', '-')}: must be 1-100000")
    done = provision_satellite(
        ctx.api,
        args.satellite_ids[0],
        host=args.broker_host or ctx.settings.urls[0].host,
        port=args.broker_port,
        tls=args.tls,
        rotate=args.rotate,
        disconnect=args.disconnect,
        max_connections=args.max_connections,
        max_channels=args.max_channels,
    )
    if args.json:
        _print_json(done.as_dict())
    else:
        render.provisioned(done, vhost=ctx.api.vhost)
    return EXIT_OK


def _revoke(args: argparse.Namespace, ctx: Context) -> int:
    done = revoke_satellite(ctx.api, args.satellite_ids[0])
    if args.json:
        _print_json(done.as_dict())
    elif done.deleted:
        print(f"deleted broker user {done.user}; closed {done.closed_connections} connection(s)")
    else:
        print(f"no broker user {done.user}; closed {done.closed_connections} connection(s)")
    return EXIT_OK


def _prepare_job(args: argparse.Namespace) -> None:
    try:
        validate_satellite_id(args.satellite_id)
    except ValueError as exc:
        raise ConfigError(f"ID {args.satellite_id!r}: {exc}") from None
    file = getattr(args, "file", None)
    if args.kind is None:
        if file is None:
            raise ConfigError("submit: give a KIND and its options, or --file JOBS.jsonl")
        if not 1 <= args.window <= 100_000:
            raise ConfigError("--window: must be 1-100000")
        args.jobs = open_jobs_file(file)
        return
    if file is not None:
        raise ConfigError("--file: cannot be combined with a KIND")
    args.job = job_from_args(JobKind(args.kind), args, os.environ)


def _submit(args: argparse.Namespace, ctx: Context) -> int:
    if args.kind is None:
        return _submit_file(args, ctx)
    job: JobRequest = args.job
    job_id = ctx.client.submit(
        args.satellite_id,
        job,
        priority=args.priority,
        expiration=args.expiration,
        lane=args.lane,
    )
    if args.json:
        _print_json({"ok": True, "job_id": job_id, "satellite_id": args.satellite_id})
    else:
        print(job_id)
    return EXIT_OK


def _submit_file(args: argparse.Namespace, ctx: Context) -> int:
    jobs: list[JobRequest] = args.jobs
    show = args.progress and not args.json and sys.stderr.isatty()
    with render.progress_bar(len(jobs), enabled=show, label="submitting") as advance:
        report = ctx.client.submit_many(
            args.satellite_id, jobs, window=args.window, progress=advance
        )
    return _bulk_report(args, report, len(jobs))


def _bulk_report(args: argparse.Namespace, report: BulkReport, total: int) -> int:
    """Print what a `submit --file` did (JSON, or a line and the first refusals); its exit code."""
    if args.json:
        _print_json({**report.as_dict(), "satellite_id": args.satellite_id})
    else:
        print(
            f"submitted {report.submitted} of {total} job(s) to satellite "
            f"{args.satellite_id} in {report.seconds:.2f} s ({report.rate:,.0f} jobs/s)"
        )
        for job_id, reason in report.failed[:20]:
            print(f"not taken: {job_id}: {reason}", file=sys.stderr)
        if len(report.failed) > 20:
            print(f"... and {len(report.failed) - 20} more not taken", file=sys.stderr)
    return EXIT_OK if not report.failed else EXIT_ERROR


def _call(args: argparse.Namespace, ctx: Context) -> int:
    job: JobRequest = args.job
    result: JobResult = ctx.client.call(
        args.satellite_id, job, timeout=args.timeout, priority=args.priority, lane=args.lane
    )
    _print_json(result.model_dump(mode="json"), indent=None if args.json else 2)
    return EXIT_OK if result.status == "ok" else EXIT_ERROR


def _prepare_results(args: argparse.Namespace) -> None:
    for sid in args.satellites or ():
        try:
            validate_satellite_id(sid)
        except ValueError as exc:
            raise ConfigError(f"--satellite {sid!r}: {exc}") from None
    if args.duration is not None and not args.follow:
        raise ConfigError("--for: only with --follow")


def _results(args: argparse.Namespace, ctx: Context) -> int:
    until = time.monotonic() + args.duration if args.duration is not None else None
    printer = render.ResultPrinter(json_lines=args.json)
    with ctx.client.result_reader(args.satellites) as reader:
        try:
            for received in reader.read(follow=args.follow, until=until):
                printer.print(received)
        except Exception:
            if reader.stats.delivered and not args.json:  # else the error says it all
                print(render.read_summary(reader.stats), file=sys.stderr)
            raise
        except KeyboardInterrupt:
            if not args.json:
                print(render.read_summary(reader.stats), file=sys.stderr)
            raise
    if not args.json:
        print(render.read_summary(reader.stats), file=sys.stderr)
    return EXIT_OK


def _status(args: argparse.Namespace, ctx: Context) -> int:
    if args.listen <= 0 or (args.watch is not None and args.watch <= 0):
        raise ConfigError("--listen/--watch: must be more than 0 seconds")
    fleet = FleetView()
    listener = ctx.client.heartbeat_listener(fleet, args.satellite_ids or None)
    try:
        if listener.missing is None:
            with render.listening(args.listen, enabled=not args.json) as progress:
                listener.listen(args.listen, progress)
        while True:
            statuses = _collect_status(args, ctx, fleet)
            code = EXIT_OK if all(s.ok for s in statuses) else EXIT_ERROR
            if args.json:
                _print_json({"ok": code == EXIT_OK, "satellites": [s.as_dict() for s in statuses]})
            else:
                render.status(statuses, clear=args.watch is not None)
            if args.watch is None:
                return code
            listener.listen(args.watch)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        listener.close()


def _collect_status(
    args: argparse.Namespace, ctx: Context, fleet: FleetView
) -> list[SatelliteStatus]:
    queues = {str(q.get("name")): q for q in ctx.api.queues()}
    ids = list(args.satellite_ids)
    if not ids:
        # The job queue, its DLQ and its interactive lane: ids have no dots, suffixes do.
        found = {
            name.removeprefix(JOB_QUEUE_PREFIX).split(".", 1)[0]
            for name in queues
            if name.startswith(JOB_QUEUE_PREFIX)
        }
        ids = sorted(found | set(fleet.satellites()))
    max_age = None if args.watch is None else max(3 * args.watch, 3 * args.listen)
    statuses = []
    for sid in ids:
        name = f"{JOB_QUEUE_PREFIX}{sid}"
        counts = ctx.client.queue_counts(name)
        queue = ctx.api.queue(name) if counts is not None else None
        if counts is not None and queue is None:
            queue = {"name": name}  # not in the management API's statistics yet
        lane_name = interactive_queue(sid)
        lane_counts = ctx.client.queue_counts(lane_name)
        lane = ctx.api.queue(lane_name) if lane_counts is not None else None
        if lane_counts is not None and lane is None:
            lane = {"name": lane_name}
        statuses.append(
            satellite_status(
                sid,
                counts=counts,
                queue=queue,
                dlq=queues.get(name + DLQ_SUFFIX),
                lane=lane,
                lane_counts=lane_counts,
                fleet=fleet,
                core_version=__version__,
                heartbeat_max_age=max_age,
            )
        )
    return statuses


def _dlq_list(args: argparse.Namespace, ctx: Context) -> int:
    letters = ctx.client.dead_letters(args.satellite_ids[0])
    if args.json:
        _print_json({"ok": True, "dead_letters": [letter.summary() for letter in letters]})
    else:
        render.dead_letters(letters)
    return EXIT_OK


def _dlq_show(args: argparse.Namespace, ctx: Context) -> int:
    letter = ctx.client.dead_letter(args.satellite_ids[0], args.job_id)
    if letter is None:
        return _fail(args, EXIT_ERROR, "not_found", f"no dead letter with job id {args.job_id}")
    _print_json(letter.details(), indent=None if args.json else 2)
    return EXIT_OK


def _dlq_replay(args: argparse.Namespace, ctx: Context) -> int:
    if bool(args.job_ids) == args.all:
        raise ConfigError("dlq replay: give JOB_IDs or --all (not both)")
    report = ctx.client.replay(args.satellite_ids[0], args.job_ids or None)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(f"replayed {len(report.replayed)} job(s) to satellite {args.satellite_ids[0]}")
        for job_id, reason in report.failed:
            print(f"not replayed: {job_id}: {reason} (left in the DLQ)", file=sys.stderr)
        for job_id in report.not_found:
            print(f"not in the DLQ: {job_id}", file=sys.stderr)
    return EXIT_OK if not report.failed and not report.not_found else EXIT_ERROR


def _dlq_purge(args: argparse.Namespace, ctx: Context) -> int:
    sid = args.satellite_ids[0]
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("dlq purge: pass --yes (stdin is not a terminal to ask on)")
        count = len(ctx.client.dead_letters(sid))
        answer = input(f"Delete {count} dead-lettered job(s) of satellite {sid}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_ERROR
    purged = ctx.client.purge_dead_letters(sid)
    if args.json:
        _print_json({"ok": True, "purged": purged, "satellite_id": sid})
    else:
        print(f"purged {purged} dead-lettered job(s) of satellite {sid}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ tokens
# `satellite token create|list|revoke`: the bearer tokens of `satellite serve` (DESIGN §10,
# docs/core-service.md). Local file work only: no broker, no DSN needed.


def _add_token(commands: Any) -> None:
    token = commands.add_parser("token", help="bearer tokens of the core service's HTTP API")
    actions = token.add_subparsers(dest="action", metavar="ACTION", required=True)
    options = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    options.add_argument(
        "--tokens-file",
        metavar="F",
        help=f"default: ${TOKENS_ENV}, else tokens.yaml in ${STATE_DIR_ENV} ({DEFAULT_STATE_DIR})",
    )
    options.add_argument("--json", action="store_true", help="machine-readable output")
    create = actions.add_parser(
        "create", parents=[options], help="add a token and print it (the only time it is shown)"
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=SCOPES,
        dest="scopes",
        help="read, submit or admin (repeatable; admin implies submit implies read)",
    )
    create.set_defaults(handler=_token_create)
    listing = actions.add_parser("list", parents=[options], help="names, scopes, creation times")
    listing.set_defaults(handler=_token_list)
    revoke = actions.add_parser("revoke", parents=[options], help="remove a token")
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(handler=_token_revoke)
    token.set_defaults(prepare=_prepare_token, needs_broker=False)


def _prepare_token(args: argparse.Namespace) -> None:
    if not hasattr(args, "tokens_file"):
        args.tokens_file = None
    elif not args.tokens_file:
        raise ConfigError("--tokens-file: must not be empty")


def _tokens_file(args: argparse.Namespace, ctx: Context) -> TokensFile:
    if args.tokens_file is not None:
        return TokensFile(args.tokens_file, label="--tokens-file")
    from_state_dir = not ctx.environ.get(TOKENS_ENV) and ctx.environ.get(STATE_DIR_ENV)
    label = STATE_DIR_ENV if from_state_dir else TOKENS_ENV
    return TokensFile(default_tokens_path(ctx.environ), label=label)


def _token_create(args: argparse.Namespace, ctx: Context) -> int:
    tokens = _tokens_file(args, ctx)
    clear = tokens.create(args.name, args.scopes)
    if args.json:
        _print_json({"name": args.name, "token": clear})
    else:
        print(clear, flush=True)
        scopes = ", ".join(s for s in SCOPES if s in args.scopes)
        print(
            f"token {args.name!r} ({scopes}) added to {tokens.path}; it is not shown again",
            file=sys.stderr,
        )
    return EXIT_OK


def _token_list(args: argparse.Namespace, ctx: Context) -> int:
    found = _tokens_file(args, ctx).list()
    if args.json:
        _print_json({"ok": True, "tokens": [t.as_dict(with_hash=True) for t in found]})
        return EXIT_OK
    if not found:
        print("no tokens")
        return EXIT_OK
    rows = [("NAME", "SCOPES", "CREATED")]
    rows += [(t.name, ",".join(t.sorted_scopes), t.as_dict()["created_at"]) for t in found]
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    for name, scopes, created in rows:
        print(f"{name:<{width[0]}}  {scopes:<{width[1]}}  {created}")
    return EXIT_OK


def _token_revoke(args: argparse.Namespace, ctx: Context) -> int:
    tokens = _tokens_file(args, ctx)
    revoked = tokens.revoke(args.name)
    if revoked is None:
        return _fail(
            args, EXIT_ERROR, "not_found", f"no token named {args.name!r} in {tokens.path}"
        )
    if args.json:
        _print_json({"ok": True, "revoked": revoked.name})
    else:
        print(f"revoked token {revoked.name!r}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ serve
# `satellite serve`: the core service (DESIGN §10, docs/core-service.md). Its settings are the
# environment's (USM_CORE_*, US_AMQP_DSN, USM_MANAGEMENT_URL); it needs the `core` extra,
# imported only here so that the other commands work without it.


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the core service: HTTP API v1, job history, result ingest",
        description=(
            "Serve the HTTP API on USM_CORE_LISTEN and keep the job history in USM_CORE_DB "
            "(default: SQLite under USM_CORE_STATE_DIR), ingesting results from "
            "usm_poller.history. Stops cleanly on SIGTERM. See docs/core-service.md."
        ),
    )
    serve.set_defaults(handler=_serve, prepare=_prepare_serve, needs_broker=False)


def _prepare_serve(args: argparse.Namespace) -> None:
    # First of all: a SIGTERM while still starting is a requested stop (exit 0), not death.
    from poller import stopsignal  # noqa: PLC0415 - standard library only

    stopsignal.install()
    _needs_core_extra(args)


def _needs_core_extra(args: argparse.Namespace) -> None:
    try:
        import satellite.service.app  # noqa: F401, PLC0415 - the `core` extra, checked early
    except ImportError as exc:
        command = f"satellite {args.command}" if getattr(args, "command", None) else "this"
        raise ConfigError(
            f"{command} needs the core extra: pip install 'satellite-poller[core]' ({exc})"
        ) from None


def _serve(args: argparse.Namespace, ctx: Context) -> int:
    import asyncio  # noqa: PLC0415

    from poller import testhooks  # noqa: PLC0415
    from satellite.service.app import run  # noqa: PLC0415 - needs the `core` extra
    from satellite.service.settings import load_settings  # noqa: PLC0415

    settings = load_settings(ctx.environ)
    testhooks.hold_start("serve")
    return asyncio.run(run(settings))


def _add_store(commands: Any) -> None:
    store = commands.add_parser("store", help="the core service's history store: copy it")
    actions = store.add_subparsers(dest="action", metavar="ACTION", required=True)
    copy = actions.add_parser(
        "copy",
        help="copy the job history into another store (SQLite to PostgreSQL)",
        description=(
            "Copy the jobs, the schedules' state and the alert silences still on from the store "
            "at --from into the one at --to (default: USM_CORE_DB), which is migrated first. "
            "Rows the target holds already are kept: a copy can be run again. "
            "See docs/core-service.md, 'From SQLite to PostgreSQL'."
        ),
    )
    copy.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="sqlite:///path or postgresql://",
    )
    copy.add_argument("--to", dest="target", metavar="URL", help="default: $USM_CORE_DB")
    copy.add_argument("--json", action="store_true", help="machine-readable output")
    copy.set_defaults(handler=_store_copy, prepare=_needs_core_extra, needs_broker=False)


def _store_copy(args: argparse.Namespace, ctx: Context) -> int:
    import asyncio  # noqa: PLC0415

    from satellite.service.settings import parse_database_url, store_from_env  # noqa: PLC0415
    from satellite.service.store.copy import CopyError, copy_store  # noqa: PLC0415

    def url(text: str, option: str) -> DatabaseUrl:
        try:
            return parse_database_url(text)
        except ValueError as exc:
            raise ConfigError(f"{option}: {exc}") from None

    source = url(args.source, "--from")
    target = url(args.target, "--to") if args.target else store_from_env(ctx.environ)

    def progress(table: str, rows: int) -> None:
        if not args.json and rows % 10_000 == 0:
            print(f"{table}: {rows:,} rows read", file=sys.stderr, flush=True)

    try:
        report = asyncio.run(copy_store(source, target, progress=progress))
    except CopyError as exc:
        raise ConfigError(str(exc)) from None
    except (OSError, sqlalchemy_error()) as exc:
        return _fail(args, EXIT_ERROR, "store", f"the copy stopped: {_db_reason(exc)}")
    if args.json:
        _print_json({"ok": True, "to": target.masked, "tables": report.as_dict()})
        return EXIT_OK
    for name, table in report.tables.items():
        print(f"{name}: {table.copied:,} copied, {table.present:,} already there")
    print(f"into {target.masked}")
    return EXIT_OK


def sqlalchemy_error() -> type[Exception]:
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - the `core` extra

    return SQLAlchemyError


def _db_reason(exc: BaseException) -> str:
    """One line about a database failure, without statement parameters or a password."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip()
    return (text.splitlines()[0] if text else type(cause).__name__)[:300]


# ------------------------------------------------------------------------------------ core API
# `--api` / USM_CORE_API: `call`, `submit` and `status` through the core service's HTTP API, and
# `jobs` / `job`, which read its job history (docs/core.md, "Through the core service's API").


def _api_options() -> _Parser:
    options = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    group = options.add_argument_group("core service API")
    group.add_argument(
        "--api",
        metavar="ADDRS",
        help=f"the core service, e.g. unix:/run/satellite/api.sock,https://core:8480, tried in "
        f"order (default: ${API_ENV}; when set, the command goes through the API, not AMQP)",
    )
    group.add_argument(
        "--token-file",
        metavar="F",
        help=f"file holding the API's bearer token (default: ${TOKEN_FILE_ENV}, else ${TOKEN_ENV})",
    )
    return options


API_OPTIONS = _api_options()
JOB_STATUSES = ("queued", "ok", "error", "overdue")


def _core_api_client(args: argparse.Namespace, environ: dict[str, str]) -> ApiClient | None:
    text, label = args.api, "--api"
    if text is None:
        text, label = environ.get(API_ENV) or None, API_ENV
    if text is None:
        return None
    addresses = parse_addresses(text, label=label)
    token = resolve_token(args.token_file, environ)
    timeout = 10.0 if args.operation_timeout is None else args.operation_timeout
    connect = 10.0 if args.connect_timeout is None else args.connect_timeout
    if timeout <= 0 or connect <= 0:
        raise ConfigError("--operation-timeout/--connect-timeout: must be more than 0 seconds")
    return ApiClient(addresses, token=token, timeout=timeout, connect_timeout=connect)


def _require_api(ctx: Context) -> ApiClient:
    api = ctx.core_api
    if api is None:
        raise ConfigError(
            f"{ctx.args.command}: give the core service's address: --api or ${API_ENV} "
            "(e.g. unix:/run/satellite/api.sock)"
        )
    return api


def _api_failed(args: argparse.Namespace, exc: ApiError) -> int:
    """One line naming the service's problem code; the exit code of docs/core.md's table."""
    if isinstance(exc, ApiProblem):
        if exc.status in (400, 413, 422):
            code = EXIT_USAGE
        elif exc.status in (404, 409):
            code = EXIT_ERROR
        else:  # 401, 403, 503 (broker or store down), other 5xx
            code = EXIT_BROKER
        message = f"core API ({exc.address}): {exc}"
        return _fail(args, code, "api", message, problem=exc.code, status=str(exc.status))
    return _fail(args, EXIT_BROKER, "unreachable", str(exc))


def _add_history(commands: Any, common: _Parser) -> None:
    jobs = commands.add_parser(
        "jobs",
        parents=[common, API_OPTIONS],
        help="search the core service's job history, newest first (--api)",
    )
    jobs.add_argument("--satellite", metavar="ID")
    jobs.add_argument("--host", metavar="H", help="the job's target host")
    jobs.add_argument("--kind", metavar="K", help="e.g. snmp.get")
    jobs.add_argument("--status", choices=JOB_STATUSES)
    jobs.add_argument("--code", metavar="C", help="the error code, e.g. device_timeout")
    jobs.add_argument("--source", metavar="S", help="api, cli, amqp or schedule:NAME")
    jobs.add_argument(
        "--since", metavar="T", help="recorded at or after T (ISO 8601; UTC without an offset)"
    )
    jobs.add_argument("--until", metavar="T", help="recorded before T (ISO 8601)")
    jobs.add_argument("--limit", type=int, default=50, metavar="N", help="1-1000 (50)")
    jobs.add_argument("--cursor", metavar="C", help="the next page, as printed by the last one")
    jobs.set_defaults(handler=_jobs, prepare=_prepare_jobs, needs_broker=False)
    job = commands.add_parser(
        "job", parents=[common, API_OPTIONS], help="one job of the core service's history (--api)"
    )
    job.add_argument("job_id", metavar="ID")
    job.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds while the job is queued (exit 3 if it still is)",
    )
    job.set_defaults(handler=_job, prepare=_prepare_job_lookup, needs_broker=False)


def _prepare_jobs(args: argparse.Namespace) -> None:
    if not 1 <= args.limit <= 1000:
        raise ConfigError("--limit: must be 1-1000")
    for name in ("since", "until"):
        value = getattr(args, name)
        if value is None:
            continue
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(
                f"--{name}: {value!r} is not an ISO 8601 time (e.g. 2026-12-06T21:00:00Z)"
            ) from None


def _prepare_job_lookup(args: argparse.Namespace) -> None:
    if not args.job_id or not math.isfinite(args.wait) or args.wait < 0:
        raise ConfigError("job: give a job ID and a --wait of 0 or more seconds")


def _jobs(args: argparse.Namespace, ctx: Context) -> int:
    filters = {
        "satellite": args.satellite,
        "host": args.host,
        "kind": args.kind,
        "status": args.status,
        "code": args.code,
        "source": args.source,
        "since": args.since,
        "until": args.until,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    page = _require_api(ctx).jobs(filters)
    if args.json:
        _print_json(page)
        return EXIT_OK
    render.job_table(page.get("items") or [])
    if page.get("next_cursor"):
        print(f"more: --cursor {page['next_cursor']}")
    return EXIT_OK


def _wait_for_record(api: ApiClient, record: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Long-poll `GET /v1/jobs/{id}?wait=` while the job is queued, until `deadline`."""
    while record.get("status") == "queued":
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        record = api.job(str(record["id"]), wait=min(remaining, MAX_WAIT_SECONDS))
    return record


def _job(args: argparse.Namespace, ctx: Context) -> int:
    api = _require_api(ctx)
    deadline = time.monotonic() + args.wait
    record = api.job(args.job_id, wait=min(args.wait, MAX_WAIT_SECONDS))
    record = _wait_for_record(api, record, deadline)
    if args.json:
        _print_json(record)
    else:
        render.job_record(record)
    status = record.get("status")
    if status == "queued":
        return EXIT_NO_RESULT if args.wait > 0 else EXIT_OK
    return EXIT_OK if status == "ok" else EXIT_ERROR


def _no_api_option(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) is not None:
            option = "--" + name.replace("_", "-")
            raise ConfigError(f"{option}: not available through the core API (--api/{API_ENV})")


def _submit_api(args: argparse.Namespace, ctx: Context) -> int:
    api = _require_api(ctx)
    if args.kind is None:
        return _submit_file_api(args, api)
    _no_api_option(args, "priority", "expiration")
    record, _ = api.submit(args.satellite_id, wire.encode(args.job))
    if args.json:
        _print_json({"ok": True, "job_id": record["id"], "satellite_id": args.satellite_id})
    else:
        print(record["id"])
    return EXIT_OK


def _submit_file_api(args: argparse.Namespace, api: ApiClient) -> int:
    jobs: list[JobRequest] = args.jobs
    report = BulkReport()
    started = time.monotonic()
    show = args.progress and not args.json and sys.stderr.isatty()
    with render.progress_bar(len(jobs), enabled=show, label="submitting") as advance:
        for first in range(0, len(jobs), MAX_BATCH_JOBS):
            chunk = jobs[first : first + MAX_BATCH_JOBS]
            answer = api.submit_batch(args.satellite_id, [wire.encode(job) for job in chunk])
            report.submitted += len(answer.get("ids") or [])
            report.failed += [(str(i), "not_published") for i in answer.get("not_published") or []]
            advance(len(chunk))
    report.seconds = time.monotonic() - started
    return _bulk_report(args, report, len(jobs))


def _call_api(args: argparse.Namespace, ctx: Context) -> int:
    api = _require_api(ctx)
    _no_api_option(args, "priority")
    job: JobRequest = args.job
    timeout = job.timeout + CALL_MARGIN_SECONDS if args.timeout is None else args.timeout
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError("--timeout: must be more than 0 seconds")
    deadline = time.monotonic() + timeout
    record, _ = api.submit(args.satellite_id, wire.encode(job), wait=timeout)
    record = _wait_for_record(api, record, deadline)
    found = record.get("result")
    if record.get("error_code") == "not_published" and not found:
        message = f"the broker did not take job {record['id']} (satellite {args.satellite_id})"
        return _fail(args, EXIT_BROKER, "broker", message)
    if not isinstance(found, dict):
        message = (
            f"no result for job {record['id']} from satellite {args.satellite_id} within "
            f"{timeout:g} s (status {record.get('status')}; see `satellite job {record['id']}`)"
        )
        return _fail(args, EXIT_NO_RESULT, "no_result", message, job_id=str(record["id"]))
    try:
        printed: dict[str, Any] = JobResult.model_validate(found).model_dump(mode="json")
    except ValueError:  # a result this version cannot model (a newer poller): as it came
        printed = found
    _print_json(printed, indent=None if args.json else 2)
    return EXIT_OK if printed.get("status") == "ok" else EXIT_ERROR


def _status_api(args: argparse.Namespace, ctx: Context) -> int:
    api = _require_api(ctx)
    if args.listen <= 0 or (args.watch is not None and args.watch <= 0):
        raise ConfigError("--listen/--watch: must be more than 0 seconds")
    try:
        while True:
            if args.satellite_ids:
                statuses = [api.satellites(sid) for sid in args.satellite_ids]
            else:
                statuses = list(api.satellites().get("satellites") or [])
            code = EXIT_OK if all(s.get("ok") for s in statuses) else EXIT_ERROR
            if args.json:
                _print_json({"ok": code == EXIT_OK, "satellites": statuses})
            else:
                render.status(statuses, clear=args.watch is not None)
            if args.watch is None:
                return code
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# ------------------------------------------------------------------------------------ alerts
# `satellite alerts list|history|silence` over the core service's API (docs/operations.md,
# "Alerts"). `list` exits 1 while an alert fires (as `status` does for a problem).

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ALERT_RULES = ("satellite_down", "backlog", "dlq", "overdue", "version_skew", "quarantine")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `2h`, `1d` -> seconds; `ValueError` for anything else or <= 0."""
    text = text.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:], 0)
    number = float(text[:-1] if unit else text)
    seconds = number * (unit or 1)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(text)
    return seconds


def _add_alerts(commands: Any, common: _Parser) -> None:
    alerts = commands.add_parser("alerts", help="alerts of the core service: states, silences")
    actions = alerts.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", parents=[common, API_OPTIONS], help="alert states per satellite and silences"
    )
    listing.set_defaults(handler=_alerts_list)
    history = actions.add_parser(
        "history",
        parents=[common, API_OPTIONS],
        help="the notifications' archive: every delivery attempt, newest first",
    )
    history.add_argument("--satellite", metavar="ID")
    history.add_argument("--limit", type=int, default=50, metavar="N", help="1-1000 (50)")
    history.set_defaults(handler=_alerts_history)
    silence = actions.add_parser(
        "silence",
        parents=[common, API_OPTIONS],
        help="no notifications for a satellite until a time (admin token)",
    )
    silence.add_argument("satellite_id", metavar="SAT")
    silence.add_argument(
        "--for", dest="duration", required=True, metavar="D", help="how long: 90s, 30m, 2h, 1d"
    )
    silence.add_argument("--reason", required=True, metavar="TEXT")
    silence.add_argument("--rule", choices=ALERT_RULES, help="one rule (default: every rule)")
    silence.set_defaults(handler=_alerts_silence)
    alerts.set_defaults(prepare=_prepare_alerts, needs_broker=False)


def _prepare_alerts(args: argparse.Namespace) -> None:
    if args.alerts_command == "history" and not 1 <= args.limit <= 1000:
        raise ConfigError("--limit: must be 1-1000")
    if args.alerts_command == "silence":
        try:
            args.seconds = parse_duration(args.duration)
        except ValueError:
            raise ConfigError(
                f"--for: {args.duration!r} is not a duration such as 90s, 30m, 2h or 1d"
            ) from None
        if not args.reason.strip():
            raise ConfigError("--reason: must not be empty")


def _alerts_list(args: argparse.Namespace, ctx: Context) -> int:
    found = _require_api(ctx).alerts()
    code = EXIT_ERROR if found.get("firing") else EXIT_OK
    if args.json:
        _print_json(found)
        return code
    for sat in found.get("satellites") or []:
        for alert in sat.get("alerts") or []:
            if alert.get("state") != "firing":
                continue
            mute = " (silenced)" if alert.get("silenced") else ""
            print(
                f"FIRING  {sat['satellite_id']:<20} {alert['rule']:<15} since "
                f"{alert['since']}{mute}  {alert.get('summary', '')}"
            )
    if not found.get("firing"):
        print("no alert firing")
    for silence in found.get("silences") or []:
        rule = silence.get("rule") or "every rule"
        print(
            f"silenced {silence['satellite_id']} ({rule}) until {silence['ends_at']}: "
            f"{silence['reason']} [{silence.get('created_by') or '?'}]"
        )
    for channel in found.get("channels") or []:
        if channel.get("failing"):
            print(
                f"channel {channel['name']} is failing: {channel['pending']} waiting, "
                f"{channel['attempts']} attempts, last error: {channel.get('last_error')}",
                file=sys.stderr,
            )
    return code


def _alerts_history(args: argparse.Namespace, ctx: Context) -> int:
    found = _require_api(ctx).notifications(limit=args.limit, satellite_id=args.satellite)
    if args.json:
        _print_json(found)
        return EXIT_OK
    for item in found.get("notifications") or []:
        http = item.get("http_status") or "-"
        error = f"  {item['error']}" if item.get("error") else ""
        print(
            f"{item['at']}  {item['status']:<6} {item['channel']:<12} {item['satellite_id']:<20} "
            f"{item['rule']:<15} {item['state']:<8} attempt {item['attempt']} HTTP {http}{error}"
        )
    waiting = found.get("pending") or []
    if waiting:
        print(f"{len(waiting)} notification(s) waiting for delivery")
    return EXIT_OK


def _alerts_silence(args: argparse.Namespace, ctx: Context) -> int:
    made = _require_api(ctx).silence(args.satellite_id, args.seconds, args.reason, args.rule)
    if args.json:
        _print_json(made)
    else:
        print(f"silenced {made['satellite_id']} until {made['ends_at']} (id {made['id']})")
    return EXIT_OK


# ------------------------------------------------------------------------------------ schedule
# `satellite schedule list|show|run|pause|resume`: the schedules of `satellite serve`, through
# its API (docs/schedules.md); `--json` prints the API's answer as it came.


def _add_schedule(commands: Any, common: _Parser) -> None:
    schedule = commands.add_parser(
        "schedule",
        parents=[common, API_OPTIONS],
        help="the core service's schedules: list, show, run now, pause, resume (--api)",
    )
    actions = schedule.add_subparsers(dest="schedule_action", metavar="ACTION", required=True)
    actions.add_parser(
        "list", parents=[common, API_OPTIONS], help="every schedule: next and last fire, counts"
    )
    for action, text in (
        ("show", "one schedule"),
        ("run", "send its jobs now, outside its clock"),
        ("pause", "pause it (kept in the store)"),
        ("resume", "resume it"),
    ):
        sub = actions.add_parser(action, parents=[common, API_OPTIONS], help=text)
        sub.add_argument("name", metavar="NAME")
        if action == "run":
            sub.add_argument("--target", metavar="HOST", help="only this target (host[:port])")
    schedule.set_defaults(handler=_schedule, prepare=lambda _args: None, needs_broker=False)


def _schedule(args: argparse.Namespace, ctx: Context) -> int:
    api = _require_api(ctx)
    action = args.schedule_action
    if action == "list":
        answer = api.schedules()
    elif action == "show":
        answer = api.schedules(args.name)
    else:
        answer = api.schedule_action(args.name, action, target=getattr(args, "target", None))
    if args.json:
        _print_json(answer)
    elif action == "list":
        items = answer.get("items") or []
        for item in items:
            print(_schedule_line(item))
        print(f"{len(items)} schedule(s)")
    elif action == "run":
        published = answer.get("published") or []
        print(f"{args.name}: {len(published)} job(s) published")
        for job_id in published:
            print(job_id)
    else:
        print(_schedule_line(answer))
    return EXIT_OK


def _schedule_line(item: dict[str, Any]) -> str:
    last = item.get("last_interval") or {}
    clock = f"every {item['every']}s" if item.get("every") else f"cron {item.get('cron')!r}"
    state = "paused" if item.get("paused") else ("enabled" if item.get("enabled") else "disabled")
    skipped = sum(int(v) for k, v in (last.get("skipped") or {}).items() if k != "not_published")
    return (
        f"{item.get('name')}: {clock}, {item.get('targets')} target(s), {state}; "
        f"next {item.get('next_fire') or '-'}, last {item.get('last_fire') or '-'}; "
        f"last interval: sent {last.get('sent', 0)}, answered {last.get('answered', 0)}, "
        f"failed {last.get('failed', 0)}, skipped {skipped}"
    )


if __name__ == "__main__":  # pragma: no cover - last, after every function is defined
    sys.exit(main())
