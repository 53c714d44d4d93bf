"""`satellite`: the core-side command line. Parses arguments, calls `Client`, prints.

Exit codes (stable, documented in docs/core.md):

- 0: done (`call`: the result's status is `ok`)
- 1: `call`: the result's status is `error`; `declare`: some object exists with other arguments
- 2: a bad argument or setting (one line on stderr)
- 3: `call`: no result within `--timeout`
- 4: the broker is unreachable or did not take the job (unroutable, refused, no confirm)
- 130: interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from poller.errors import BrokerError, ConfigError
from poller.wire import JobKind, JobRequest, JobResult, validate_satellite_id
from satellite import __version__
from satellite.client import Client
from satellite.config import DSN_ENV, load_core_settings
from satellite.dispatch import InvalidJobError, NoResultError
from satellite.jobargs import KIND_OPTIONS, add_job_arguments, job_from_args
from satellite.topology import DeclareReport, Outcome, core_topology

__all__ = ["EXIT_BROKER", "EXIT_ERROR", "EXIT_NO_RESULT", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_RESULT = 3
EXIT_BROKER = 4
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace, Client], int]
Prepare = Callable[[argparse.Namespace], None]


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="satellite", description="Core-side toolkit of the satellite poller.")
    parser.add_argument("--version", action="version", version=f"satellite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    common = _Parser(add_help=False)
    broker = common.add_argument_group("broker")
    broker.add_argument(
        "--dsn", help=f"broker URL(s), comma-separated for failover (default: ${DSN_ENV})"
    )
    broker.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help="give up connecting after S seconds, all nodes and retries included (30)",
    )
    broker.add_argument(
        "--operation-timeout", type=float, metavar="S", help="per broker round trip (10)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

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
    declare.set_defaults(handler=_declare, prepare=_prepare_declare)

    submit_opts = _Parser(add_help=False)
    submit_opts.add_argument("--priority", type=int, choices=range(10), metavar="0-9")
    submit_opts.add_argument(
        "--expiration", type=float, metavar="S", help="drop the job if not taken within S seconds"
    )
    call_opts = _Parser(add_help=False)
    call_opts.add_argument("--priority", type=int, choices=range(10), metavar="0-9")
    call_opts.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds to wait for the result (default: the job's timeout + 10)",
    )

    for name, handler, extra, text in (
        ("submit", _submit, submit_opts, "publish one job and print its id"),
        ("call", _call, call_opts, "publish one job and wait for its result"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("satellite_id", metavar="ID")
        kinds = sub.add_subparsers(dest="kind", metavar="KIND", required=True)
        for kind, options in KIND_OPTIONS.items():
            kind_parser = kinds.add_parser(
                kind.value, parents=[common, extra], help=options.help, description=options.help
            )
            add_job_arguments(kind_parser)
            options.add_arguments(kind_parser)
        sub.set_defaults(handler=handler, prepare=_prepare_job)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="satellite: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    prepare: Prepare = args.prepare
    try:
        prepare(args)  # every argument is checked before connecting
        settings = load_core_settings(
            args.dsn,
            connect_timeout=args.connect_timeout,
            operation_timeout=args.operation_timeout,
        )
        with Client(settings) as client:
            return handler(args, client)
    except (ConfigError, InvalidJobError) as exc:
        return _fail(args, EXIT_USAGE, "usage", str(exc))
    except NoResultError as exc:
        return _fail(args, EXIT_NO_RESULT, exc.code, str(exc), job_id=exc.job_id)
    except BrokerError as exc:
        return _fail(args, EXIT_BROKER, "broker", str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(args: argparse.Namespace, code: int, kind: str, message: str, **extra: str) -> int:
    print(f"satellite: {message}", file=sys.stderr)
    if args.json:
        _print_json({"ok": False, "error": {"code": kind, "message": message, **extra}})
    return code


def _print_json(value: Any, out: TextIO | None = None, *, indent: int | None = None) -> None:
    print(json.dumps(value, indent=indent), file=out or sys.stdout)


# ------------------------------------------------------------------------------------ commands


def _prepare_declare(args: argparse.Namespace) -> None:
    try:
        core_topology(args.satellite_ids)
    except ValueError as exc:
        raise ConfigError(f"ID {exc}") from None


def _declare(args: argparse.Namespace, client: Client) -> int:
    report = client.declare(
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


def _prepare_job(args: argparse.Namespace) -> None:
    try:
        validate_satellite_id(args.satellite_id)
    except ValueError as exc:
        raise ConfigError(f"ID {args.satellite_id!r}: {exc}") from None
    args.job = job_from_args(JobKind(args.kind), args, os.environ)


def _submit(args: argparse.Namespace, client: Client) -> int:
    job: JobRequest = args.job
    job_id = client.submit(
        args.satellite_id, job, priority=args.priority, expiration=args.expiration
    )
    if args.json:
        _print_json({"ok": True, "job_id": job_id, "satellite_id": args.satellite_id})
    else:
        print(job_id)
    return EXIT_OK


def _call(args: argparse.Namespace, client: Client) -> int:
    job: JobRequest = args.job
    result: JobResult = client.call(
        args.satellite_id, job, timeout=args.timeout, priority=args.priority
    )
    _print_json(result.model_dump(mode="json"), indent=None if args.json else 2)
    return EXIT_OK if result.status == "ok" else EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
