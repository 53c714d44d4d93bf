"""SNMP driver: `snmp.get`, `snmp.getnext`, `snmp.walk` and `snmp.set` over a pluggable backend.

The driver turns a job into calls on an `SnmpBackend` (Net-SNMP through ezsnmp, or pysnmp) and
chooses the backend (`USM_POLLER_SNMP_BACKEND`). What every backend shares (the seam, its types
and the pure helpers) lives in `poller.drivers.snmp_base`, which the backends import instead of
this module: the driver imports the backends, never the other way round. Only
`poller.drivers.snmp_pysnmp` imports pysnmp and only `poller.drivers.snmp_netsnmp` imports ezsnmp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Self

from poller.drivers.base import Auth, Data, JobContext

# The shared names, importable from here as they were before `snmp_base` existed.
from poller.drivers.snmp_base import (
    DEFAULT_PORT,
    ERROR_STATUS_NAMES,
    OutputBudget,
    SetValue,
    SmiType,
    SnmpBackend,
    SnmpTarget,
    Varbind,
    WalkResult,
    WalkStep,
    error_status_name,
    format_oid,
    is_printable_text,
    oid_in_subtree,
    parse_oid,
    plan_timeout,
    render_varbind,
    set_value,
    snmp_status_error,
    walk_step,
)
from poller.errors import ConfigError, SnmpError
from poller.wire import (
    JobKind,
    JobRequest,
    SnmpAuth,
    SnmpGetJob,
    SnmpGetNextJob,
    SnmpSetJob,
    SnmpWalkJob,
)

if TYPE_CHECKING:
    from poller.config import PollerSettings

__all__ = [
    "DEFAULT_PORT",
    "ERROR_STATUS_NAMES",
    "OutputBudget",
    "SetValue",
    "SmiType",
    "SnmpBackend",
    "SnmpDriver",
    "SnmpOptions",
    "SnmpTarget",
    "Varbind",
    "WalkResult",
    "WalkStep",
    "error_status_name",
    "format_oid",
    "is_printable_text",
    "oid_in_subtree",
    "parse_oid",
    "plan_timeout",
    "render_varbind",
    "set_value",
    "snmp_status_error",
    "walk_step",
]

# --------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True, slots=True)
class SnmpOptions:
    """Driver options: per-request timeout (seconds), retries, which backend to use, the size
    of the Net-SNMP backend's thread pool and the sessions each of its threads keeps open."""

    timeout: float = 2.0
    retries: int = 2
    backend: Literal["auto", "pysnmp", "netsnmp"] = "auto"
    threads: int = 32
    #: Net-SNMP sessions kept open per pool thread for plain v1/v2c GETs (0: every request
    #: through ezsnmp); the Net-SNMP backend only.
    open_sessions: int = 8

    @classmethod
    def from_settings(cls, settings: PollerSettings) -> Self:
        return cls(
            timeout=settings.snmp_timeout,
            retries=settings.snmp_retries,
            backend=settings.snmp_backend,
            # A thread per run slot: jobs of silent devices block theirs until the deadline.
            threads=min(256, settings.concurrency),
            open_sessions=settings.snmp_open_sessions,
        )


def _make_backend(options: SnmpOptions) -> SnmpBackend:
    """The backend `options.backend` names; `auto` prefers Net-SNMP when ezsnmp imports."""
    if options.backend in ("auto", "netsnmp"):
        try:
            from poller.drivers.snmp_netsnmp import NetsnmpBackend  # noqa: PLC0415 - optional
        except ImportError as exc:
            if options.backend == "netsnmp":
                raise ConfigError(
                    "USM_POLLER_SNMP_BACKEND=netsnmp needs the ezsnmp package, which cannot be "
                    f"imported ({exc}); install it or set USM_POLLER_SNMP_BACKEND=auto or pysnmp"
                ) from None
        else:
            return NetsnmpBackend(threads=options.threads, open_sessions=options.open_sessions)
    from poller.drivers.snmp_pysnmp import PysnmpBackend  # noqa: PLC0415 - pysnmp on first use

    return PysnmpBackend()


class SnmpDriver:
    """Runs the four SNMP job kinds. One instance (and one SNMP engine) per process."""

    kinds: ClassVar[frozenset[JobKind]] = frozenset(
        {JobKind.SNMP_GET, JobKind.SNMP_GETNEXT, JobKind.SNMP_WALK, JobKind.SNMP_SET}
    )

    def __init__(
        self, options: SnmpOptions | None = None, *, backend: SnmpBackend | None = None
    ) -> None:
        self.options = options or SnmpOptions()
        self.backend = backend if backend is not None else _make_backend(self.options)

    @classmethod
    def from_settings(cls, settings: PollerSettings) -> SnmpDriver:
        return cls(SnmpOptions.from_settings(settings))

    async def run(self, job: JobRequest, auth: Auth | None, ctx: JobContext) -> Data:
        if not isinstance(auth, SnmpAuth):
            raise SnmpError("an SNMP job needs SNMP credentials (version, community or user)")
        target = SnmpTarget(
            host=job.target.host,
            port=job.target.port or DEFAULT_PORT,
            auth=auth,
            deadline=ctx.deadline,
            timeout=self.options.timeout,
            retries=self.options.retries,
            max_output_bytes=ctx.max_output_bytes,
            guarded=ctx.guarded,
        )
        if isinstance(job, SnmpGetJob):
            return {"varbinds": list(await self.backend.get(target, job.params.oids))}
        if isinstance(job, SnmpGetNextJob):
            return {"varbinds": list(await self.backend.getnext(target, job.params.oids))}
        if isinstance(job, SnmpWalkJob):
            walked = await self.backend.walk(
                target,
                job.params.oids,
                max_repetitions=job.params.max_repetitions,
                max_varbinds=job.params.max_varbinds,
            )
            return {"varbinds": list(walked.varbinds), "truncated": walked.truncated}
        if isinstance(job, SnmpSetJob):
            values = [set_value(i, vb) for i, vb in enumerate(job.params.varbinds)]
            return {"varbinds": list(await self.backend.set(target, values))}
        raise SnmpError(f"the SNMP driver does not run {job.kind!r} jobs")

    async def aclose(self) -> None:
        await self.backend.aclose()
