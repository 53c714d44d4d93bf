"""The job options of the command line, shared by `poller exec` and `satellite call|submit`.

One definition of every option of every kind, so that both commands spell and mean them the
same: each kind has a `KindOptions` (a function adding its argparse options and one turning the
parsed options into the job's `auth` and `params`); adding a kind is one entry in
`KIND_OPTIONS`. Options shared by every kind (`--host`, `--port`, `--credential-ref`,
`--job-timeout`, `--not-after`, `--meta`, `--id`, `--idempotent`) are added by
`add_job_arguments`; `job_body` turns the parsed options into a job message (a dict in the wire
format, not yet validated). SNMP options also have Net-SNMP's letters (`-v 2c -c public`,
`-u -l -a -A -x -X -n`).

Secrets never have to be on the command line: each one can come from `--NAME-file PATH` or an
environment variable, and SSH/telnet passwords can *only* come from there. Errors raise
`ConfigError` with one line naming the option; secret values are never echoed.

Pure: argparse and `poller.wire` only (no runner, no drivers), so `satellite` may import it.
"""

from __future__ import annotations

import argparse
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, get_args

from pydantic import JsonValue

from poller.errors import ConfigError
from poller.wire import PROTOCOL_VERSION, JobKind, SetType, format_timestamp

__all__ = [
    "KIND_OPTIONS",
    "Environ",
    "JobParts",
    "KindOptions",
    "SecretOption",
    "add_job_arguments",
    "job_body",
    "job_parts",
    "job_target",
    "parse_varbind",
]

Environ = Mapping[str, str]


class ArgumentContainer(Protocol):
    """An `argparse` parser or argument group."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action: ...


@dataclass(frozen=True, slots=True)
class JobParts:
    """What a kind contributes to a job: its `params` and (unless a credential_ref) `auth`."""

    params: dict[str, Any] | None = None
    auth: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class KindOptions:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    build: Callable[[argparse.Namespace, Environ], JobParts]


@dataclass(frozen=True, slots=True)
class SecretOption:
    """A secret read from `--NAME VALUE` (when `inline`), `--NAME-file PATH` or env `ENV`."""

    name: str
    env: str
    inline: bool = False
    letter: str | None = None
    """Net-SNMP's one-letter spelling of the inline option (`-c` for `--community`)."""

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def add(self, parser: ArgumentContainer, what: str) -> None:
        if self.inline:
            flags = (f"-{self.letter}",) if self.letter else ()
            parser.add_argument(
                *flags,
                f"--{self.name}",
                dest=self.dest,
                metavar="VALUE",
                help=f"{what} (visible to other local users: prefer --{self.name}-file or "
                f"${self.env})",
            )
        parser.add_argument(
            f"--{self.name}-file",
            metavar="PATH",
            type=Path,
            help=f"read the {what} from this file (default: ${self.env})",
        )

    def read(self, ns: argparse.Namespace, environ: Environ) -> str | None:
        """The value from the command line, else the file, else the environment, else None."""
        value: str | None = getattr(ns, self.dest, None) if self.inline else None
        if value:
            return value
        path: Path | None = getattr(ns, f"{self.dest}_file", None)
        if path is not None:
            try:
                value = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or "not UTF-8 text"
                raise ConfigError(f"--{self.name}-file: cannot read {path}: {reason}") from None
            value = value.removesuffix("\n").removesuffix("\r")
            if not value:
                raise ConfigError(f"--{self.name}-file: {path} is empty")
            return value
        return environ.get(self.env) or None

    def given(self, ns: argparse.Namespace) -> bool:
        inline = getattr(ns, self.dest, None) if self.inline else None
        return bool(inline) or getattr(ns, f"{self.dest}_file", None) is not None


# --------------------------------------------------------------------------------------------
# Options shared by every kind


def add_job_arguments(
    parser: argparse.ArgumentParser, *, job_timeout_default: float | None = None
) -> None:
    """The options every kind has; `job_timeout_default` None: the wire default (30 s)."""
    group = parser.add_argument_group("job")
    group.add_argument("--host", required=True, help="device address (IP or DNS name)")
    group.add_argument("--port", type=_port, help="device port (default: the protocol's)")
    group.add_argument(
        "--credential-ref",
        metavar="NAME",
        help="use credentials NAME from the satellite's credentials file instead of any given here",
    )
    default = 30 if job_timeout_default is None else job_timeout_default
    group.add_argument(
        "--job-timeout",
        type=float,
        default=job_timeout_default,
        metavar="S",
        help=f"whole-job deadline on the poller in seconds (default {default:g}, max 3600)",
    )
    group.add_argument(
        "--not-after",
        type=_not_after,
        metavar="WHEN",
        help="do not run after this time: RFC 3339 (2026-11-23T10:00:00Z) or +SECONDS from now",
    )
    group.add_argument(
        "--meta", type=_meta, metavar="JSON", help="JSON object echoed in the result"
    )
    group.add_argument("--id", dest="job_id", metavar="ID", help="job id (default: a new UUID)")
    group.add_argument(
        "--idempotent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the job may run twice after a redelivery (default: yes, except snmp.set)",
    )


def job_parts(kind: JobKind | str, ns: argparse.Namespace, environ: Environ) -> JobParts:
    """The `auth` (None with a credential_ref) and `params` of `kind` from its options."""
    parts = KIND_OPTIONS[JobKind(kind)].build(ns, environ)
    if JobKind(kind) in _SSH_KINDS and not ns.credential_ref:
        auth = parts.auth or {}
        if not auth.get("password") and not auth.get("private_key"):
            # The driver would refuse it as `auth_failed` after a trip to the device.
            raise ConfigError(
                f"--password-file: an SSH login needs a password or a private key "
                f"(--password-file, ${PASSWORD.env}, --private-key-file, ${PRIVATE_KEY.env} "
                "or --credential-ref)"
            )
    return JobParts(params=parts.params, auth=None if ns.credential_ref else parts.auth)


def job_body(
    kind: JobKind | str, ns: argparse.Namespace, environ: Environ | None = None
) -> dict[str, Any]:
    """The job message the options describe, as a JSON-ready dict (not validated yet).

    Options left out are left out of the message: the wire protocol's defaults apply. Raises
    `ConfigError` naming the option at fault.
    """
    kind = JobKind(kind)
    parts = job_parts(kind, ns, environ or {})
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": ns.job_id or str(uuid.uuid4()),
        "kind": kind.value,
        "target": job_target(ns),
    }
    optional = {
        "auth": parts.auth,
        "credential_ref": ns.credential_ref,
        "params": parts.params,
        "timeout": ns.job_timeout,
        "not_after": format_timestamp(ns.not_after) if ns.not_after else None,
        "idempotent": ns.idempotent,
        "meta": ns.meta,
    }
    return body | {key: value for key, value in optional.items() if value is not None}


def job_target(ns: argparse.Namespace) -> dict[str, Any]:
    target: dict[str, Any] = {"host": ns.host}
    if ns.port is not None:
        target["port"] = ns.port
    return target


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError("must be a number from 1 to 65535")
    return port


_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smh]?)$")


def _not_after(text: str) -> datetime:
    match = _RELATIVE.match(text)
    if match:
        factor = {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
        return datetime.now(UTC) + timedelta(seconds=float(match.group(1)) * factor)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be RFC 3339 or +SECONDS") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError("needs a time zone, for example a trailing Z")
    return when


def _meta(text: str) -> dict[str, JsonValue]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError("is not valid JSON") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _refuse_with_ref(ns: argparse.Namespace, *secrets: SecretOption) -> None:
    for secret in secrets:
        if secret.given(ns):
            raise ConfigError(f"--{secret.name}: give either credentials or --credential-ref")


# --------------------------------------------------------------------------------------------
# SNMP

COMMUNITY = SecretOption("community", "USM_SNMP_COMMUNITY", inline=True, letter="c")
AUTH_KEY = SecretOption("auth-key", "USM_SNMP_AUTH_KEY", inline=True, letter="A")
PRIV_KEY = SecretOption("priv-key", "USM_SNMP_PRIV_KEY", inline=True, letter="X")


def _add_snmp(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SNMP (Net-SNMP's letters work too)")
    group.add_argument("-v", "--snmp-version", choices=["1", "2c", "3"], default="2c")
    COMMUNITY.add(group, "community (v1/v2c)")
    group.add_argument("-u", "--user", help="SNMPv3 user name")
    group.add_argument(
        "-l",
        "--security-level",
        choices=["noAuthNoPriv", "authNoPriv", "authPriv"],
        default=None,
    )
    group.add_argument(
        "-a", "--auth-protocol", choices=["MD5", "SHA", "SHA224", "SHA256", "SHA384", "SHA512"]
    )
    AUTH_KEY.add(group, "SNMPv3 authentication key")
    group.add_argument("-x", "--priv-protocol", choices=["DES", "AES", "AES192", "AES256"])
    PRIV_KEY.add(group, "SNMPv3 privacy key")
    group.add_argument("-n", "--context", default=None, help="SNMPv3 context name")


def _snmp_auth(ns: argparse.Namespace, environ: Environ) -> dict[str, Any] | None:
    if ns.credential_ref:
        _refuse_with_ref(ns, COMMUNITY, AUTH_KEY, PRIV_KEY)
        return None
    if ns.snmp_version in ("1", "2c"):
        community = COMMUNITY.read(ns, environ)
        if community is None:
            raise ConfigError(
                f"--community: SNMP v{ns.snmp_version} needs a community (--community, "
                f"--community-file, ${COMMUNITY.env} or --credential-ref)"
            )
        return {"version": ns.snmp_version, "community": community}
    if not ns.user:
        raise ConfigError("--user: SNMPv3 needs a user name")
    auth = {
        "version": "3",
        "user": ns.user,
        "security_level": ns.security_level,
        "auth_protocol": ns.auth_protocol,
        "auth_key": AUTH_KEY.read(ns, environ),
        "priv_protocol": ns.priv_protocol,
        "priv_key": PRIV_KEY.read(ns, environ),
        "context": ns.context,
    }
    return {key: value for key, value in auth.items() if value is not None}


def _add_snmp_oids(parser: argparse.ArgumentParser) -> None:
    _add_snmp(parser)
    parser.add_argument("oids", nargs="+", metavar="OID", help="numeric OIDs")


def _build_snmp_oids(ns: argparse.Namespace, environ: Environ) -> JobParts:
    return JobParts(params={"oids": ns.oids}, auth=_snmp_auth(ns, environ))


def _add_snmp_walk(parser: argparse.ArgumentParser) -> None:
    _add_snmp_oids(parser)
    parser.add_argument("--max-repetitions", type=int, metavar="N", help="GETBULK size (25)")
    parser.add_argument("--max-varbinds", type=int, metavar="N", help="stop after N (200000)")


def _build_snmp_walk(ns: argparse.Namespace, environ: Environ) -> JobParts:
    params: dict[str, Any] = {"oids": ns.oids}
    if ns.max_repetitions is not None:
        params["max_repetitions"] = ns.max_repetitions
    if ns.max_varbinds is not None:
        params["max_varbinds"] = ns.max_varbinds
    return JobParts(params=params, auth=_snmp_auth(ns, environ))


_SET_TYPES: dict[str, str] = {name.lower(): name for name in get_args(SetType)}
#: Net-SNMP `snmpset` type letters, for muscle memory. `x` is an OctetString given in hex.
_SET_LETTERS = {
    "i": "Integer",
    "u": "Unsigned32",
    "s": "OctetString",
    "x": "OctetString",
    "o": "ObjectIdentifier",
    "a": "IpAddress",
    "t": "TimeTicks",
    "c": "Counter32",
    "g": "Gauge32",
}
_STRING_TYPES = {"OctetString", "ObjectIdentifier", "IpAddress", "Opaque"}


def parse_varbind(text: str) -> dict[str, Any]:
    """`OID=TYPE:VALUE` (TYPE an SMI name, `Hex` or a snmpset letter) → a set varbind."""
    oid, sep, rest = text.partition("=")
    type_name, sep2, value = rest.partition(":")
    if not sep or not sep2 or not oid:
        raise argparse.ArgumentTypeError("must be OID=TYPE:VALUE, e.g. 1.3.6.1.2.1.1.5.0=s:sw-1")
    hex_value = type_name.lower() in ("x", "hex")
    smi = "OctetString" if hex_value else _SET_LETTERS.get(type_name)
    smi = smi or _SET_TYPES.get(type_name.lower())
    if smi is None:
        known = ", ".join(sorted(_SET_TYPES.values()))
        raise argparse.ArgumentTypeError(f"unknown type {type_name!r} (one of {known}, Hex)")
    varbind: dict[str, Any] = {"oid": oid, "type": smi}
    if hex_value:
        varbind |= {"value": value.replace(":", "").replace(" ", ""), "hex": True}
    elif smi in _STRING_TYPES:
        varbind["value"] = value
    else:
        try:
            varbind["value"] = int(value, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{smi} needs an integer value") from None
    return varbind


def _add_snmp_set(parser: argparse.ArgumentParser) -> None:
    _add_snmp(parser)
    parser.add_argument(
        "varbinds", nargs="+", type=parse_varbind, metavar="OID=TYPE:VALUE", help="to set"
    )


def _build_snmp_set(ns: argparse.Namespace, environ: Environ) -> JobParts:
    return JobParts(params={"varbinds": ns.varbinds}, auth=_snmp_auth(ns, environ))


# --------------------------------------------------------------------------------------------
# SSH and telnet: passwords only from files or the environment

PASSWORD = SecretOption("password", "USM_SSH_PASSWORD")
PRIVATE_KEY = SecretOption("private-key", "USM_SSH_PRIVATE_KEY")
ENABLE_PASSWORD = SecretOption("enable-password", "USM_SSH_ENABLE_PASSWORD")


def _add_login(parser: argparse.ArgumentParser, *, enable: bool) -> None:
    group = parser.add_argument_group("login")
    group.add_argument("--username", help="login name")
    PASSWORD.add(group, "password")
    PRIVATE_KEY.add(group, "private key (PEM or OpenSSH)")
    if enable:
        ENABLE_PASSWORD.add(group, "enable password")
    group.add_argument("--host-key", help="pinned OpenSSH public key of the device")
    parser.add_argument(
        "--command",
        dest="commands",
        action="append",
        required=True,
        metavar="TEXT",
        help="command to run (repeat for several, run in order)",
    )


def _login_auth(ns: argparse.Namespace, environ: Environ, *, enable: bool) -> dict[str, Any]:
    secrets = (PASSWORD, PRIVATE_KEY, *((ENABLE_PASSWORD,) if enable else ()))
    if ns.credential_ref:
        _refuse_with_ref(ns, *secrets)
        return {}
    auth = {
        "username": ns.username,
        "password": PASSWORD.read(ns, environ),
        "private_key": PRIVATE_KEY.read(ns, environ),
        "enable_password": ENABLE_PASSWORD.read(ns, environ) if enable else None,
        "host_key": ns.host_key,
    }
    if auth["username"] is None:
        raise ConfigError("--username: a login needs a user name (or --credential-ref)")
    return {key: value for key, value in auth.items() if value is not None}


def _add_ssh_exec(parser: argparse.ArgumentParser) -> None:
    _add_login(parser, enable=False)


def _build_ssh_exec(ns: argparse.Namespace, environ: Environ) -> JobParts:
    return JobParts(params={"commands": ns.commands}, auth=_login_auth(ns, environ, enable=False))


def _add_cli(parser: argparse.ArgumentParser) -> None:
    _add_login(parser, enable=True)
    parser.add_argument("--platform", default=None, help="device platform (default: generic)")
    parser.add_argument("--enable", action="store_true", help="enter privileged mode first")


def _build_cli(ns: argparse.Namespace, environ: Environ) -> JobParts:
    params: dict[str, Any] = {"commands": ns.commands, "enable": ns.enable}
    if ns.platform:
        params["platform"] = ns.platform
    return JobParts(params=params, auth=_login_auth(ns, environ, enable=True))


# --------------------------------------------------------------------------------------------
# ICMP and TCP: no credentials


def _add_ping(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ping")
    group.add_argument("--count", type=int, help="echo requests (3)")
    group.add_argument("--interval", type=float, metavar="S", help="seconds between them (0.2)")
    group.add_argument("--size", type=int, metavar="BYTES", help="payload size (56)")


def _build_ping(ns: argparse.Namespace, environ: Environ) -> JobParts:
    params = {name: getattr(ns, name) for name in ("count", "interval", "size")}
    return JobParts(params={k: v for k, v in params.items() if v is not None})


def _add_tcp(parser: argparse.ArgumentParser) -> None:
    """tcp.connect takes its port from --port."""


def _build_tcp(ns: argparse.Namespace, environ: Environ) -> JobParts:
    if ns.port is None:
        raise ConfigError("--port: tcp.connect needs the port to connect to")
    return JobParts(params={"port": ns.port})


_SSH_KINDS = frozenset({JobKind.SSH_EXEC, JobKind.SSH_CLI})
_SNMP_OIDS = KindOptions("SNMP get/getnext of OIDs", _add_snmp_oids, _build_snmp_oids)
_CLI = KindOptions("commands in an interactive CLI session", _add_cli, _build_cli)

KIND_OPTIONS: dict[JobKind, KindOptions] = {
    JobKind.SNMP_GET: _SNMP_OIDS,
    JobKind.SNMP_GETNEXT: _SNMP_OIDS,
    JobKind.SNMP_WALK: KindOptions("SNMP walk of OID subtrees", _add_snmp_walk, _build_snmp_walk),
    JobKind.SNMP_SET: KindOptions("SNMP set of OID=TYPE:VALUE", _add_snmp_set, _build_snmp_set),
    JobKind.SSH_EXEC: KindOptions("run commands over SSH exec", _add_ssh_exec, _build_ssh_exec),
    JobKind.SSH_CLI: _CLI,
    JobKind.TELNET_CLI: _CLI,
    JobKind.ICMP_PING: KindOptions("ICMP echo", _add_ping, _build_ping),
    JobKind.TCP_CONNECT: KindOptions("TCP connect to --port", _add_tcp, _build_tcp),
}
