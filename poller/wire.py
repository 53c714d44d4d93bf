"""Wire protocol v1: job, result and heartbeat messages, and every broker name.

This module owns the format. Two entry points cross the process boundary: `encode(model)` and
`decode_job(body)`; `decode_job` raises `WireError` and nothing else. Queue, exchange and
routing-key names are built only by the functions at the bottom of this file.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self, TypedDict

import pydantic_core
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, SchemaValidator
from pydantic_core import core_schema as cs

from poller.errors import WireError

__all__ = [
    "LANE_HEADER",
    "PROTOCOL_VERSION",
    "CliAuth",
    "CliJob",
    "CliParams",
    "ErrorInfo",
    "Heartbeat",
    "JobKind",
    "JobRequest",
    "JobResult",
    "Lane",
    "PingJob",
    "PingParams",
    "QuarantineEntry",
    "ResultFields",
    "SetVarbind",
    "SnmpAuth",
    "SnmpGetJob",
    "SnmpGetNextJob",
    "SnmpJob",
    "SnmpOidParams",
    "SnmpSetJob",
    "SnmpSetParams",
    "SnmpWalkJob",
    "SnmpWalkParams",
    "SshExecJob",
    "SshExecParams",
    "Target",
    "TcpConnectJob",
    "TcpParams",
    "build_result",
    "decode_job",
    "decode_result",
    "encode",
    "format_timestamp",
    "validate_job",
    "validate_satellite_id",
]

PROTOCOL_VERSION = 1
MAX_JOB_ID_CHARS = 128
MAX_META_BYTES = 16 * 1024
MAX_TIMEOUT_SECONDS = 3600.0
DEFAULT_TIMEOUT_SECONDS = 30.0
SATELLITE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_OID_RE = re.compile(r"^\.?(?:0|[1-9]\d{0,9})(?:\.(?:0|[1-9]\d{0,9})){1,127}$")


class JobKind(StrEnum):
    SNMP_GET = "snmp.get"
    SNMP_GETNEXT = "snmp.getnext"
    SNMP_WALK = "snmp.walk"
    SNMP_SET = "snmp.set"
    SSH_EXEC = "ssh.exec"
    SSH_CLI = "ssh.cli"
    TELNET_CLI = "telnet.cli"
    ICMP_PING = "icmp.ping"
    TCP_CONNECT = "tcp.connect"


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a `Z`, as every timestamp on the wire.

    The text of `value.astimezone(UTC).isoformat(timespec="milliseconds")` with `Z` for
    `+00:00`, spelled out: `isoformat` with `timespec` costs ~4x as much, and every result
    carries two timestamps.
    """
    utc = value.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031 - the fastest spelling
        utc.year,
        utc.month,
        utc.day,
        utc.hour,
        utc.minute,
        utc.second,
        utc.microsecond // 1000,
    )


def _reveal(value: SecretStr) -> str:
    return value.get_secret_value()


#: A secret that is masked in repr and logs but travels in clear inside the JSON body.
Secret = Annotated[SecretStr, PlainSerializer(_reveal, return_type=str, when_used="json")]
Timestamp = Annotated[AwareDatetime, PlainSerializer(format_timestamp, when_used="json")]
JobId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_JOB_ID_CHARS)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _normalise_oid(value: str) -> str:
    if not _OID_RE.match(value):
        raise ValueError("not a numeric OID such as 1.3.6.1.2.1.1.5.0")
    return value.removeprefix(".")


Oid = Annotated[str, StringConstraints(max_length=1400)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Jobs


class Target(_Model):
    host: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\s/]+$")]
    port: int | None = Field(default=None, ge=1, le=65535)


class SnmpAuth(_Model):
    version: Literal["1", "2c", "3"] = "2c"
    community: Secret | None = None
    user: Name | None = None
    security_level: Literal["noAuthNoPriv", "authNoPriv", "authPriv"] | None = None
    auth_protocol: Literal["MD5", "SHA", "SHA224", "SHA256", "SHA384", "SHA512"] | None = None
    auth_key: Secret | None = None
    priv_protocol: Literal["DES", "AES", "AES192", "AES256"] | None = None
    priv_key: Secret | None = None
    context: Annotated[str, StringConstraints(max_length=256)] = ""

    @model_validator(mode="after")
    def _check_version_fields(self) -> Self:
        if self.version in ("1", "2c"):
            if self.community is None:
                raise ValueError(f"SNMP v{self.version} needs a community")
            return self
        if self.user is None:
            raise ValueError("SNMPv3 needs a user")
        level = self.effective_security_level
        if level in ("authNoPriv", "authPriv") and not self.auth_key:
            raise ValueError(f"security_level {level} needs auth_key")
        if level == "authPriv" and not self.priv_key:
            raise ValueError("security_level authPriv needs priv_key")
        for name in ("auth_key", "priv_key"):
            key: SecretStr | None = getattr(self, name)
            if key is not None and len(key.get_secret_value()) < 8:
                raise ValueError(f"{name} must be at least 8 characters (RFC 3414)")
        return self

    @property
    def effective_security_level(self) -> str:
        """The declared level, or the one implied by the keys that are present."""
        if self.security_level is not None:
            return self.security_level
        if self.priv_key is not None:
            return "authPriv"
        if self.auth_key is not None:
            return "authNoPriv"
        return "noAuthNoPriv"


class CliAuth(_Model):
    username: Name | None = None
    password: Secret | None = None
    private_key: Secret | None = None
    enable_password: Secret | None = None
    host_key: Annotated[str, StringConstraints(max_length=16384)] | None = None


class SnmpOidParams(_Model):
    oids: Annotated[list[Oid], Field(min_length=1, max_length=1000)]

    @field_validator("oids")
    @classmethod
    def _oids(cls, value: list[str]) -> list[str]:
        match = _OID_RE.match
        normal = value
        for index, oid in enumerate(value):
            if match(oid) is None:
                raise ValueError("not a numeric OID such as 1.3.6.1.2.1.1.5.0")
            if oid[0] == ".":  # a leading dot, rare: a copy without it
                if normal is value:
                    normal = list(value)
                normal[index] = oid[1:]
        return normal


class SnmpWalkParams(SnmpOidParams):
    oids: Annotated[list[Oid], Field(min_length=1, max_length=100)]
    max_repetitions: int = Field(default=25, ge=1, le=1000)
    max_varbinds: int = Field(default=200_000, ge=1, le=10_000_000)


SetType = Literal[
    "Integer",
    "OctetString",
    "ObjectIdentifier",
    "IpAddress",
    "Counter32",
    "Gauge32",
    "TimeTicks",
    "Opaque",
    "Counter64",
    "Unsigned32",
]


class SetVarbind(_Model):
    oid: Oid
    type: SetType
    value: int | str
    hex: bool = False

    @field_validator("oid")
    @classmethod
    def _oid(cls, value: str) -> str:
        return _normalise_oid(value)


class SnmpSetParams(_Model):
    varbinds: Annotated[list[SetVarbind], Field(min_length=1, max_length=1000)]


Command = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class SshExecParams(_Model):
    commands: Annotated[list[Command], Field(min_length=1, max_length=200)]


class CliParams(_Model):
    platform: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "generic"
    commands: Annotated[list[Command], Field(min_length=1, max_length=200)]
    enable: bool = False


class PingParams(_Model):
    count: int = Field(default=3, ge=1, le=100)
    interval: float = Field(default=0.2, ge=0.01, le=10.0)
    size: int = Field(default=56, ge=0, le=65000)


class TcpParams(_Model):
    port: int = Field(ge=1, le=65535)


def _no_auth(value: object) -> None:
    """`{}` and `null` mean "no credentials" (a core may send every job with the same keys)."""
    if value is None or (isinstance(value, dict) and not value):
        return None
    raise ValueError("this kind takes no credentials: leave auth out, or send {} or null")


#: `auth` of a kind that takes none: absent, `{}` or `null`, all read as None. Never written out,
#: so a job built here decodes on pollers that refused the key.
NoAuth = Annotated[None, BeforeValidator(_no_auth), Field(exclude=True)]


class _JobBase(_Model):
    needs_auth: ClassVar[bool] = True

    v: Literal[1]
    id: JobId
    target: Target
    timeout: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0, le=MAX_TIMEOUT_SECONDS)
    not_after: Timestamp | None = None
    idempotent: bool = True
    credential_ref: Name | None = None
    meta: dict[str, JsonValue] | None = None

    @field_validator("v", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("must be the number 1")  # noqa: TRY004 - pydantic wants ValueError
        return value

    @field_validator("meta")
    @classmethod
    def _meta_size(cls, value: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
        if value is not None and not _meta_is_small(value):
            raise ValueError(f"meta is larger than {MAX_META_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _auth_or_ref(self) -> Self:
        auth = getattr(self, "auth", None)
        if not self.needs_auth:
            if self.credential_ref is not None:
                raise ValueError("this kind takes no credentials")
        elif (auth is None) == (self.credential_ref is None):
            raise ValueError("give exactly one of auth and credential_ref")
        return self


#: `json.dumps` writes at most this many characters per byte of pydantic-core's compact JSON of
#: the same value: 6 for a character it escapes as `\u007f` that pydantic-core writes as is;
#: `", "` and `": "` for `,` and `:`, and `1e-07` for `1e-7`, stay below it.
_DUMPS_CHARS_PER_COMPACT_BYTE = 6


def _meta_is_small(value: dict[str, JsonValue]) -> bool:
    """`len(json.dumps(value)) <= MAX_META_BYTES`, usually without running `json.dumps`.

    The limit is on `json.dumps`'s text; pydantic-core's compact JSON is ~6x cheaper to make, and
    when even 6 characters per byte of it stay within the limit, `json.dumps` would too.
    """
    try:
        compact = len(pydantic_core.to_json(value))
    except (ValueError, RecursionError):  # pragma: no cover - defer to json.dumps below
        compact = MAX_META_BYTES
    if compact * _DUMPS_CHARS_PER_COMPACT_BYTE <= MAX_META_BYTES:
        return True
    return len(json.dumps(value)) <= MAX_META_BYTES


class SnmpGetJob(_JobBase):
    kind: Literal["snmp.get"]
    auth: SnmpAuth | None = None
    params: SnmpOidParams


class SnmpGetNextJob(_JobBase):
    kind: Literal["snmp.getnext"]
    auth: SnmpAuth | None = None
    params: SnmpOidParams


class SnmpWalkJob(_JobBase):
    kind: Literal["snmp.walk"]
    auth: SnmpAuth | None = None
    params: SnmpWalkParams


class SnmpSetJob(_JobBase):
    kind: Literal["snmp.set"]
    auth: SnmpAuth | None = None
    params: SnmpSetParams
    idempotent: bool = False


class SshExecJob(_JobBase):
    kind: Literal["ssh.exec"]
    auth: CliAuth | None = None
    params: SshExecParams


class CliJob(_JobBase):
    kind: Literal["ssh.cli", "telnet.cli"]
    auth: CliAuth | None = None
    params: CliParams


class PingJob(_JobBase):
    needs_auth = False
    kind: Literal["icmp.ping"]
    auth: NoAuth = None
    params: PingParams = PingParams()


class TcpConnectJob(_JobBase):
    """The port is `params.port`, else `target.port` (as for every other kind).

    Both are accepted, and `params.port` wins when both are given; the job is normalised to carry
    it in `params.port`, which is also what pollers before `target.port` was read expect.
    """

    needs_auth = False
    kind: Literal["tcp.connect"]
    auth: NoAuth = None
    params: TcpParams

    @model_validator(mode="before")
    @classmethod
    def _port_from_target(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # not an object: the model's own validation says so
        params, target = data.get("params"), data.get("target")
        if isinstance(params, dict):
            if params.get("port") is not None:
                return data
        elif params is not None:
            return data  # a TcpParams has its port; anything else the model reports
        if isinstance(target, dict):
            port = target.get("port")
        elif isinstance(target, Target):
            port = target.port
        else:
            return data  # no target (or not an object): the model reports it
        if port is None:
            raise ValueError("tcp.connect needs a port: target.port or params.port")
        return data | {"params": (params or {}) | {"port": port}}


SnmpJob = SnmpGetJob | SnmpGetNextJob | SnmpWalkJob | SnmpSetJob
JobRequest = Annotated[
    SnmpGetJob
    | SnmpGetNextJob
    | SnmpWalkJob
    | SnmpSetJob
    | SshExecJob
    | CliJob
    | PingJob
    | TcpConnectJob,
    Field(discriminator="kind"),
]

_JOB_ADAPTER: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)
#: The adapter's compiled validator, called directly: `TypeAdapter.validate_json` only adds
#: keyword handling around it, on every job.
_JOB_VALIDATOR = _JOB_ADAPTER.validator


# --------------------------------------------------------------------------------------------
# Results and heartbeats


class ErrorInfo(_Model):
    code: str
    message: str
    retryable: bool


class JobResult(_Model):
    v: Literal[1] = 1
    job_id: str
    kind: str
    satellite_id: str
    worker: str
    status: Literal["ok", "error"]
    data: dict[str, JsonValue] | None = None
    error: ErrorInfo | None = None
    attempt: int = Field(ge=1)
    redelivered: bool
    started_at: Timestamp
    finished_at: Timestamp
    duration_ms: float
    meta: dict[str, JsonValue] | None = None


class QuarantineEntry(_Model):
    device: str
    since: Timestamp
    until: Timestamp
    last_error: str


class Heartbeat(_Model):
    """A replica's periodic status. Unlike jobs, fields a reader does not know are ignored:
    a core keeps reading the heartbeats of pollers newer than itself."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    satellite_id: str
    worker: str
    version: str
    hostname: str
    started_at: Timestamp
    sent_at: Timestamp
    concurrency: int
    in_flight: int
    jobs_ok: int
    jobs_error: int
    jobs_per_s: float
    loop_lag_ms: float
    rss_bytes: int
    quarantine: list[QuarantineEntry] = []
    #: Times this replica recycled before this process started, as far as its state dir
    #: remembers (docs/operations.md, "Memory and recycling"), and why the last time
    #: (`rss` or `jobs`; a str, so that a core reads reasons added later).
    recycles: int = Field(default=0, ge=0)
    last_recycle: Annotated[str, StringConstraints(max_length=32)] | None = None


_RESULT_ADAPTER: TypeAdapter[JobResult] = TypeAdapter(JobResult)


def _flat_data_schema() -> CoreSchema:
    """`data` as every driver writes it, checked without calling back into Python.

    An object whose values are scalars or lists of objects of scalars (varbinds, command
    results, ping and connect figures). `JsonValue` asks a Python function for the type of
    every value; these strict choices stay in pydantic-core. Each accepts a subset of what
    `JsonValue` accepts and gives what it gives (a `str` subclass becomes a `str`, keys keep
    their order: tests/unit/test_wire.py), so anything else is left to `JsonValue`.
    """
    text, whole = cs.str_schema(strict=True), cs.int_schema(strict=True)
    flag, real = cs.bool_schema(strict=True), cs.float_schema(strict=True)
    scalar = cs.nullable_schema(cs.union_schema([text, whole, flag, real], mode="left_to_right"))
    row = cs.dict_schema(text, scalar, strict=True)
    value = cs.nullable_schema(
        cs.union_schema(
            [cs.list_schema(row, strict=True), text, whole, flag, real], mode="left_to_right"
        )
    )
    return cs.dict_schema(text, value, strict=True)


def _quick_result_validator() -> SchemaValidator | None:
    """`JobResult`'s validator with `data` and `meta` tried as `_flat_data_schema` first, then
    as `JsonValue`: it accepts what the model accepts and gives the same result. None if the
    model's schema is not laid out as expected (then every result takes the model's path)."""
    schema: Any = copy.deepcopy(JobResult.__pydantic_core_schema__)
    model = schema["schema"] if schema.get("type") == "definitions" else schema
    try:
        if model["type"] != "model" or model["cls"] is not JobResult:
            return None
        for name in ("data", "meta"):
            field = model["schema"]["fields"][name]["schema"]  # default -> nullable -> dict
            nullable = field["schema"]
            if field["type"] != "default" or nullable["type"] != "nullable":
                return None
            if nullable["schema"]["type"] != "dict":
                return None
            nullable["schema"] = cs.union_schema(
                [_flat_data_schema(), nullable["schema"]], mode="left_to_right"
            )
    except (KeyError, TypeError):
        return None
    # pydantic-core builds the schema of a complete model as that model's own validator, and
    # would ignore the change above: it is built as for a model that is not complete yet.
    complete = JobResult.__dict__.get("__pydantic_complete__")
    if complete is not True:
        return None
    type.__setattr__(JobResult, "__pydantic_complete__", False)
    try:
        return SchemaValidator(schema)
    finally:
        type.__setattr__(JobResult, "__pydantic_complete__", complete)


_QUICK_RESULT = _quick_result_validator()


class ResultFields(TypedDict):
    """The fields of a `JobResult`, for `build_result`."""

    job_id: str
    kind: str
    satellite_id: str
    worker: str
    status: Literal["ok", "error"]
    data: dict[str, JsonValue] | None
    error: ErrorInfo | None
    attempt: int
    redelivered: bool
    started_at: datetime
    finished_at: datetime
    duration_ms: float
    meta: dict[str, JsonValue] | None


def build_result(fields: ResultFields) -> JobResult:
    """`JobResult(**fields)`: the same result, or the same `ValidationError`.

    `data` and `meta` of the usual shape (`_flat_data_schema`) are checked in pydantic-core
    alone, other JSON as `JsonValue` checks it; an invalid result is built again through the
    model for its errors, so a driver that returns data that is not JSON fails as before.
    """
    quick = _QUICK_RESULT
    if quick is not None:
        try:
            result: JobResult = quick.validate_python(fields)
        except ValidationError:
            pass
        else:
            return result
    return JobResult(**fields)


def encode(model: BaseModel) -> bytes:
    """Serialise any wire model to its JSON body (secrets in clear: the body is the message).

    The bytes of `model.model_dump_json().encode()`, from the model's serializer straight:
    `model_dump_json` decodes its bytes to text, which would only be encoded again.
    """
    return model.__pydantic_serializer__.to_json(model)


def decode_result(body: bytes) -> JobResult:
    try:
        return _RESULT_ADAPTER.validate_json(body)
    except ValidationError as exc:
        raise WireError(f"invalid result message: {_describe(exc)}") from None


def decode_job(body: bytes, *, max_bytes: int | None = None) -> JobRequest:
    """Parse and validate one job body; raise `WireError` (and only that) when it is not a job."""
    if max_bytes is not None and len(body) > max_bytes:
        raise WireError(f"job body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        job: JobRequest = _JOB_VALIDATOR.validate_json(body)
    except ValidationError as exc:
        raise _classify(body, exc) from None
    except Exception as exc:  # noqa: BLE001 - the contract is: WireError and nothing else
        raise WireError(f"job body could not be parsed ({type(exc).__name__})") from None
    return job


def validate_job(raw: object) -> JobRequest:
    """`decode_job` for a body parsed already (the core service parses it once to fill in `v`
    and `id`): the same validation, the same `WireError`s, and only those.

    A valid job is validated from the objects as they are; an invalid one is encoded and given
    to `decode_job`, so that its error says what a poller would say (the wording of pydantic's
    errors depends on whether it reads JSON or Python objects).
    """
    try:
        job: JobRequest = _JOB_VALIDATOR.validate_python(raw)
    except Exception:  # noqa: BLE001 - decode_job decides, and raises WireError only
        try:
            body = json.dumps(raw).encode()
        except (TypeError, ValueError, RecursionError):
            raise WireError("job body is not JSON") from None
        return decode_job(body)
    return job


def _classify(body: bytes, exc: ValidationError) -> WireError:
    """Turn a validation failure into the most useful `WireError`, reading the id if possible."""
    try:
        raw: Any = json.loads(body)
    except (ValueError, RecursionError):
        return WireError("job body is not valid UTF-8 JSON")
    if not isinstance(raw, dict):
        return WireError("job body must be a JSON object")
    job_id = raw.get("id")
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= MAX_JOB_ID_CHARS:
        job_id = None
    kind = raw.get("kind")
    kind = kind if isinstance(kind, str) and len(kind) <= 64 else None
    version = raw.get("v")
    if "v" in raw and (version != PROTOCOL_VERSION or isinstance(version, bool)):
        shown = repr(version)[:20]
        return WireError(
            f"protocol version {shown} is not supported (this poller speaks {PROTOCOL_VERSION})",
            code="unsupported_version",
            job_id=job_id,
            kind=kind,
        )
    if kind is not None and kind not in _KINDS:
        near = difflib.get_close_matches(kind, _KINDS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return WireError(
            f"unknown job kind {kind!r}{hint}", code="unknown_kind", job_id=job_id, kind=kind
        )
    return WireError(f"invalid job: {_describe(exc)}", job_id=job_id, kind=kind)


_KINDS = [k.value for k in JobKind]


def _describe(exc: ValidationError, limit: int = 5) -> str:
    """Field paths and reasons only: input values are never repeated (they may be secrets)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        parts.append(f"{loc or 'body'}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and part in _KINDS


# --------------------------------------------------------------------------------------------
# Broker names: the only place they are spelled out.


def validate_satellite_id(satellite_id: str) -> str:
    if not SATELLITE_ID_RE.match(satellite_id):
        raise ValueError("a satellite id is 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return satellite_id


def jobs_exchange() -> str:
    return "usm_poller.jobs"


def jobs_queue(satellite_id: str) -> str:
    return f"usm_poller-sat-{validate_satellite_id(satellite_id)}"


def jobs_routing_key(satellite_id: str) -> str:
    return validate_satellite_id(satellite_id)


def satellite_of_jobs_queue(name: str) -> str | None:
    """The satellite whose job queue is called `name`, or None (a DLQ, another queue)."""
    prefix = "usm_poller-sat-"
    rest = name[len(prefix) :] if name.startswith(prefix) else ""
    return rest if SATELLITE_ID_RE.match(rest) else None


def interactive_queue(satellite_id: str) -> str:
    """The interactive lane (DESIGN §13): jobs a person waits for, consumed apart from the bulk."""
    return f"{jobs_queue(satellite_id)}.interactive"


def interactive_routing_key(satellite_id: str) -> str:
    return f"{validate_satellite_id(satellite_id)}.interactive"


#: Lanes a job can come from; a result says which one in the `LANE_HEADER` header.
Lane = Literal["interactive", "bulk"]
LANE_HEADER = "x-lane"
#: Header of a job the core published again after its connection was lost before the confirm:
#: the first copy may have reached the queue too, so the poller treats this one as redelivered
#: (flagged in its result; a non-idempotent job is answered `outcome_unknown`).
RESENT_HEADER = "x-usm-resent"


def lane_routing_key(satellite_id: str, lane: Lane) -> str:
    """The routing key on `jobs_exchange()` of a satellite's job queue for `lane`."""
    if lane == "interactive":
        return interactive_routing_key(satellite_id)
    return jobs_routing_key(satellite_id)


def dead_letter_exchange() -> str:
    return "usm_poller.dlx"


def dead_letter_queue(satellite_id: str) -> str:
    return f"{jobs_queue(satellite_id)}.dlq"


def results_exchange() -> str:
    return "usm_poller.results"


def results_queue() -> str:
    return "usm_poller.results"


def results_binding_key() -> str:
    return "result.#"


def history_queue() -> str:
    """The core service's ingest queue (DESIGN §10): every result, apart from the core's own."""
    return "usm_poller.history"


def history_binding_keys() -> tuple[str, ...]:
    """`usm_poller.history` gets results and RPC replies alike."""
    return ("result.#", "reply.#")


def history_queue_arguments() -> dict[str, str | int]:
    return {"x-queue-type": "quorum"}


def core_reply_queue(replica: str) -> str:
    """A `satellite serve` replica's own queue for the results of jobs it waits for."""
    return f"usm_poller.core-reply.{validate_satellite_id(replica)}"


def core_reply_queue_arguments() -> dict[str, str | int]:
    """A classic queue the broker deletes 10 minutes after its replica is gone."""
    return {"x-expires": 600_000}


def events_exchange() -> str:
    return "usm_poller.events"


def result_routing_key(satellite_id: str, kind: str) -> str:
    return f"result.{satellite_id}.{kind}"


def reply_routing_key(satellite_id: str, reply_to: str) -> str:
    return f"reply.{satellite_id}.{reply_to}"


def reply_binding_key(reply_to: str) -> str:
    """What an RPC caller binds its exclusive queue with, to get replies from any satellite."""
    return f"reply.*.{reply_to}"


def heartbeat_routing_key(satellite_id: str) -> str:
    return f"heartbeat.{satellite_id}"


def event_routing_key(satellite_id: str, name: str) -> str:
    return f"event.{satellite_id}.{name}"


DEFAULT_DELIVERY_LIMIT = 20


def jobs_queue_arguments(
    satellite_id: str, queue_type: Literal["quorum", "classic"] = "quorum"
) -> dict[str, str | int]:
    """Arguments of a satellite's job queue (classic queues get no quorum-only ones)."""
    args: dict[str, str | int] = {
        "x-dead-letter-exchange": dead_letter_exchange(),
        "x-dead-letter-routing-key": jobs_routing_key(satellite_id),
    }
    if queue_type == "quorum":
        args |= {
            "x-queue-type": "quorum",
            "x-delivery-limit": DEFAULT_DELIVERY_LIMIT,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    return args


#: The dead-letter queue's delivery limit: never reached. `satellite dlq` reads dead letters
#: and gives them back, and RabbitMQ 4.0-4.2 count every such return against a quorum queue's
#: limit (20 when none is set): without this, reading them 20 times would drop them.
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000


def dead_letter_queue_arguments(
    queue_type: Literal["quorum", "classic"] = "quorum",
) -> dict[str, str | int]:
    """Arguments of a satellite's dead-letter queue: quorum like its job queue, unless classic.

    A classic queue lives on one node: when that node is lost, nobody can declare, bind or read
    it until the node is back (only `USM_POLLER_QUEUE_TYPE=classic`, for single-node brokers).
    """
    if queue_type == "classic":
        return {}
    return {"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}


def results_queue_arguments() -> dict[str, str | int]:
    return {"x-queue-type": "quorum"}


def now() -> datetime:
    return datetime.now(UTC)
