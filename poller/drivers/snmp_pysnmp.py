"""The pysnmp 7 backend of the SNMP driver: the only module that imports pysnmp.

One `SnmpEngine` per backend (one backend per process), created on first use inside the running
loop and closed by `aclose()`. Requests go through pysnmp's command generators directly with
numeric OIDs and raw SMI values: no MIB is consulted on either side (the equivalent of
`lookupMib=False`, and also for requests, so a set value is sent exactly as typed).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import SecretStr
from pysnmp.entity.engine import SnmpEngine
from pysnmp.entity.rfc3413 import cmdgen
from pysnmp.error import PySnmpError
from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    Udp6TransportTarget,
    UdpTransportTarget,
    UsmUserData,
)
from pysnmp.hlapi.v3arch.asyncio import auth as usm
from pysnmp.hlapi.v3arch.asyncio.lcd import CommandGeneratorLcdConfigurator
from pysnmp.proto import errind, rfc1902, rfc1905
from pysnmp.proto.error import StatusInformation

from poller.drivers.snmp_base import (
    OutputBudget,
    SetValue,
    SmiType,
    SnmpTarget,
    Varbind,
    WalkPage,
    WalkResult,
    format_oid,
    no_response_error,
    plan_timeout,
    render_varbind,
    snmp_status_error,
    walk_roots,
    walk_subtree,
)
from poller.errors import (
    DeviceAuthError,
    DeviceTimeoutError,
    DeviceUnreachableError,
    JobError,
    SnmpError,
)
from poller.wire import SnmpAuth

__all__ = ["PysnmpBackend"]

#: Most OIDs sent in one GET/GETNEXT PDU; longer lists are split (and halved again on tooBig).
MAX_OIDS_PER_PDU = 64
_TOO_BIG = 1

_AUTH_PROTOCOLS = {
    "MD5": usm.USM_AUTH_HMAC96_MD5,
    "SHA": usm.USM_AUTH_HMAC96_SHA,
    "SHA224": usm.USM_AUTH_HMAC128_SHA224,
    "SHA256": usm.USM_AUTH_HMAC192_SHA256,
    "SHA384": usm.USM_AUTH_HMAC256_SHA384,
    "SHA512": usm.USM_AUTH_HMAC384_SHA512,
}
# AES192/AES256 use the Blumenthal key extension (draft-blumenthal-aes-usm-04), as Net-SNMP
# does; Cisco's "Reeder" variant is not selectable on the wire yet.
_PRIV_PROTOCOLS = {
    "DES": usm.USM_PRIV_CBC56_DES,
    "AES": usm.USM_PRIV_CFB128_AES,
    "AES192": usm.USM_PRIV_CFB192_AES_BLUMENTHAL,
    "AES256": usm.USM_PRIV_CFB256_AES_BLUMENTHAL,
}
#: Defaults when a job gives a key but no protocol: the defaults of Net-SNMP and pysnmp.
_DEFAULT_AUTH = "MD5"
_DEFAULT_PRIV = "DES"

_SMI_BY_TAG: dict[Any, SmiType] = {
    rfc1902.Integer32.tagSet: "Integer",
    rfc1902.OctetString.tagSet: "OctetString",
    rfc1902.ObjectIdentifier.tagSet: "ObjectIdentifier",
    rfc1902.IpAddress.tagSet: "IpAddress",
    rfc1902.Counter32.tagSet: "Counter32",
    rfc1902.Gauge32.tagSet: "Gauge32",  # Unsigned32 has the same tag
    rfc1902.TimeTicks.tagSet: "TimeTicks",
    rfc1902.Opaque.tagSet: "Opaque",
    rfc1902.Counter64.tagSet: "Counter64",
    rfc1902.Null.tagSet: "Null",
    rfc1905.NoSuchObject.tagSet: "noSuchObject",
    rfc1905.NoSuchInstance.tagSet: "noSuchInstance",
    rfc1905.EndOfMibView.tagSet: "endOfMibView",
}

_SET_CLASSES: dict[str, Callable[[Any], Any]] = {
    "Integer": rfc1902.Integer32,
    "OctetString": rfc1902.OctetString,
    "ObjectIdentifier": rfc1902.ObjectIdentifier,
    "IpAddress": rfc1902.IpAddress,
    "Counter32": rfc1902.Counter32,
    "Gauge32": rfc1902.Gauge32,
    "Unsigned32": rfc1902.Unsigned32,
    "TimeTicks": rfc1902.TimeTicks,
    "Opaque": rfc1902.Opaque,
    "Counter64": rfc1902.Counter64,
}

#: SNMPv3 reports and local USM failures that mean "these credentials were rejected".
_AUTH_FAILURES: dict[type[errind.ErrorIndication], str] = {
    errind.UnknownUserName: "the agent does not know this SNMPv3 user (usmStatsUnknownUserNames)",
    errind.WrongDigest: "wrong SNMPv3 auth key or auth protocol (usmStatsWrongDigests)",
    errind.AuthenticationFailure: "wrong SNMPv3 auth key or auth protocol (response digest)",
    errind.AuthenticationError: "SNMPv3 authentication failed",
    errind.DecryptionError: "wrong SNMPv3 priv key or priv protocol (usmStatsDecryptionErrors)",
    errind.UnsupportedSecurityLevel: (
        "the agent does not allow this security level for this user (usmStatsUnsupportedSecLevels)"
    ),
    errind.NotInTimeWindow: "SNMPv3 time window not synchronised (usmStatsNotInTimeWindows)",
}

_Raw = tuple[int, int, Sequence[tuple[Any, Any]]]
_PduKind = Literal["get", "next", "bulk", "set"]


@dataclass(frozen=True, slots=True)
class _Pdu:
    """One request to send: its type, its (name, value) pairs, GETBULK max-repetitions."""

    kind: _PduKind
    varbinds: list[tuple[Any, Any]]
    max_repetitions: int = 0


@dataclass(frozen=True, slots=True)
class _Peer:
    """Where and as whom one request goes."""

    address: tuple[str, int]
    ipv6: bool
    auth: CommunityData | UsmUserData


def _send(
    engine: SnmpEngine, addr_name: str, context: str, pdu: _Pdu, done: Callable[..., None]
) -> None:
    """Hand one PDU to pysnmp's command generator for the configured target `addr_name`."""
    if pdu.kind == "bulk":
        cmdgen.BulkCommandGeneratorSingleRun().send_varbinds(
            engine, addr_name, None, context, 0, pdu.max_repetitions, pdu.varbinds, done
        )
        return
    generator = {
        "get": cmdgen.GetCommandGenerator,
        "next": cmdgen.NextCommandGeneratorSingleRun,
        "set": cmdgen.SetCommandGenerator,
    }[pdu.kind]()
    generator.send_varbinds(engine, addr_name, None, context, pdu.varbinds, done)


def _decode(name: Any, value: Any) -> Varbind:
    """A pysnmp (ObjectName, value) pair → the rendered varbind."""
    oid = format_oid(tuple(name))
    smi = _SMI_BY_TAG.get(value.tagSet)
    if smi is None:
        raise SnmpError(f"agent returned a value of an unsupported SMI type at {oid}")
    if smi in ("OctetString", "Opaque", "IpAddress"):
        return render_varbind(oid, smi, bytes(value.asOctets()))
    if smi == "ObjectIdentifier":
        return render_varbind(oid, smi, format_oid(tuple(value)))
    if smi in ("Null", "noSuchObject", "noSuchInstance", "endOfMibView"):
        return render_varbind(oid, smi, None)
    return render_varbind(oid, smi, int(value))


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


def _auth_data(auth: SnmpAuth) -> tuple[CommunityData | UsmUserData, str]:
    """pysnmp credentials for our `SnmpAuth`, and a fingerprint of the USM keys (v3 only)."""
    if auth.version in ("1", "2c"):
        mp_model = 0 if auth.version == "1" else 1
        return CommunityData(_secret(auth.community), mpModel=mp_model), ""
    level = auth.effective_security_level
    auth_key = priv_key = None
    auth_proto = priv_proto = None
    if level in ("authNoPriv", "authPriv"):
        auth_key = _secret(auth.auth_key)
        auth_proto = _AUTH_PROTOCOLS[auth.auth_protocol or _DEFAULT_AUTH]
    if level == "authPriv":
        priv_key = _secret(auth.priv_key)
        priv_proto = _PRIV_PROTOCOLS[auth.priv_protocol or _DEFAULT_PRIV]
    data = UsmUserData(
        auth.user,
        authKey=auth_key,
        privKey=priv_key,
        authProtocol=auth_proto,
        privProtocol=priv_proto,
    )
    material = "\0".join(str(x) for x in (level, auth_proto, auth_key, priv_proto, priv_key))
    return data, hashlib.sha256(material.encode()).hexdigest()


def _indication_error(indication: object, target: SnmpTarget) -> JobError:
    """Map a pysnmp errorIndication to our error tree (never naming a secret)."""
    where = f"{target.host}:{target.port}"
    if isinstance(indication, errind.RequestTimedOut):
        return no_response_error(where, v3=target.auth.version == "3")
    for cls, message in _AUTH_FAILURES.items():
        if isinstance(indication, cls):
            user = f" for user {target.auth.user!r}" if target.auth.user else ""
            return DeviceAuthError(f"{where}: {message}{user}")
    if isinstance(indication, errind.ErrorIndication):
        return SnmpError(f"{where}: {indication}")
    return SnmpError(f"{where}: SNMP engine error ({indication})")


class _UsmGate:
    """Lets requests of one SNMPv3 user name run together only while they use the same keys.

    pysnmp keeps one key set per user name in its engine and checks a response against the
    keys configured when it arrives. A job with other keys for the same name (another device
    group, or a wrong key) therefore waits until the requests using the current keys are done.
    """

    def __init__(self) -> None:
        self.fingerprint = ""
        self.users = 0
        self.changed = asyncio.Condition()

    @asynccontextmanager
    async def use(self, fingerprint: str) -> AsyncIterator[None]:
        async with self.changed:
            await self.changed.wait_for(lambda: self.users == 0 or self.fingerprint == fingerprint)
            self.fingerprint = fingerprint
            self.users += 1
        try:
            yield
        finally:
            self.users -= 1
            if self.users == 0:
                await self._wake()

    async def _wake(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class _UdpTarget(UdpTransportTarget):  # type: ignore[misc]  # pysnmp is untyped
    """A UDP/IPv4 target from an address we already resolved (no second lookup)."""

    def __init__(self, address: tuple[str, int], timeout: float, retries: int) -> None:
        self.transport_address = address
        super().__init__(timeout=timeout, retries=retries)


class _Udp6Target(Udp6TransportTarget):  # type: ignore[misc]  # pysnmp is untyped
    def __init__(self, address: tuple[str, int], timeout: float, retries: int) -> None:
        self.transport_address = address
        super().__init__(timeout=timeout, retries=retries)


class PysnmpBackend:
    """`SnmpBackend` on pysnmp's asyncio engine."""

    def __init__(self) -> None:
        self._engine: SnmpEngine | None = None
        self._engine_lock: asyncio.Lock | None = None
        self._lcd = CommandGeneratorLcdConfigurator()
        self._gates: dict[str, _UsmGate] = {}

    # ---------------------------------------------------------------------------------------
    # SnmpBackend

    async def get(self, target: SnmpTarget, oids: Sequence[str]) -> list[Varbind]:
        return await self._per_oid(target, oids, "get")

    async def getnext(self, target: SnmpTarget, oids: Sequence[str]) -> list[Varbind]:
        return await self._per_oid(target, oids, "next")

    async def set(self, target: SnmpTarget, varbinds: Sequence[SetValue]) -> list[Varbind]:
        oids = [oid for oid, _, _ in varbinds]
        request = [
            (rfc1902.ObjectName(oid), _SET_CLASSES[smi](value)) for oid, smi, value in varbinds
        ]
        status, index, answer = await self._request(target, _Pdu("set", request))
        if status:
            raise snmp_status_error(status, index, oids, [])
        budget = OutputBudget(target.max_output_bytes)
        budget.extend([_decode(name, value) for name, value in answer])
        return budget.varbinds

    async def walk(
        self,
        target: SnmpTarget,
        roots: Sequence[str],
        *,
        max_repetitions: int,
        max_varbinds: int,
    ) -> WalkResult:
        budget = OutputBudget(target.max_output_bytes)
        return await walk_roots(
            roots,
            budget,
            lambda root: self._walk_root(target, root, budget, max_repetitions, max_varbinds),
        )

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        dispatcher = engine.transport_dispatcher
        timer = getattr(dispatcher, "loopingcall", None)
        engine.close_dispatcher()
        if isinstance(timer, asyncio.Future):
            await asyncio.gather(timer, return_exceptions=True)

    # ---------------------------------------------------------------------------------------
    # Requests

    async def _per_oid(
        self, target: SnmpTarget, oids: Sequence[str], kind: _PduKind
    ) -> list[Varbind]:
        """GET or GETNEXT of many OIDs, in PDUs of at most `MAX_OIDS_PER_PDU` (halved on tooBig)."""
        budget = OutputBudget(target.max_output_bytes)
        chunk = MAX_OIDS_PER_PDU
        start = 0
        try:
            while start < len(oids):
                part = oids[start : start + chunk]
                request = [(rfc1902.ObjectName(oid), rfc1902.Null("")) for oid in part]
                status, index, answer = await self._request(target, _Pdu(kind, request))
                if status == _TOO_BIG and len(part) > 1:
                    chunk = max(1, len(part) // 2)
                    continue
                if status:
                    raise snmp_status_error(status, index, oids, budget.varbinds, offset=start)
                budget.extend([_decode(name, value) for name, value in answer])
                start += len(part)
        except JobError as exc:
            if exc.data is None:
                exc.data = {"varbinds": list(budget.varbinds)}
            raise
        return budget.varbinds

    async def _walk_root(
        self,
        target: SnmpTarget,
        root: str,
        budget: OutputBudget,
        max_repetitions: int,
        max_varbinds: int,
    ) -> bool:
        """Walk one subtree into `budget`; True when `max_varbinds` cut the walk short."""

        async def fetch(last: tuple[int, ...], reps: int, bulk: bool) -> WalkPage:
            request = [(rfc1902.ObjectName(format_oid(last)), rfc1902.Null(""))]
            pdu = _Pdu("bulk", request, reps) if bulk else _Pdu("next", request)
            status, index, answer = await self._request(target, pdu)
            rows = [
                (tuple(name), value.tagSet == rfc1905.EndOfMibView.tagSet, _decode(name, value))
                for name, value in answer
            ]
            return WalkPage(status, index, rows)

        return await walk_subtree(
            fetch,
            root,
            budget,
            bulk=target.auth.version != "1",
            max_repetitions=max_repetitions,
            max_varbinds=max_varbinds,
        )

    async def _request(self, target: SnmpTarget, pdu: _Pdu) -> _Raw:
        """Send one PDU (with retries) and wait for its answer, never past the deadline."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(target.deadline):
                engine = await self._get_engine()
                address, six = await self._resolve(target)
                auth_data, fingerprint = _auth_data(target.auth)
                peer = _Peer(address, six, auth_data)
                if fingerprint:
                    gate = self._gates.setdefault(target.auth.user or "", _UsmGate())
                    async with gate.use(fingerprint):
                        return await self._exchange(engine, target, peer, pdu, loop)
                return await self._exchange(engine, target, peer, pdu, loop)
        except DeviceTimeoutError:
            raise
        except TimeoutError:
            raise no_response_error(
                f"{target.host}:{target.port}", v3=target.auth.version == "3", before_deadline=True
            ) from None

    async def _exchange(
        self,
        engine: SnmpEngine,
        target: SnmpTarget,
        peer: _Peer,
        pdu: _Pdu,
        loop: asyncio.AbstractEventLoop,
    ) -> _Raw:
        timeout, retries = plan_timeout(
            target.deadline - loop.time(), target.timeout, target.retries
        )
        transport_cls = _Udp6Target if peer.ipv6 else _UdpTarget
        transport = transport_cls(peer.address, timeout=timeout, retries=retries)
        context = target.auth.context if target.auth.version == "3" else ""
        future: asyncio.Future[tuple[object, int, int, Sequence[tuple[Any, Any]]]]
        future = loop.create_future()

        def done(
            _engine: object,
            _handle: object,
            indication: object,
            status: Any,
            index: Any,
            varbinds: Any,
            _ctx: object,
        ) -> None:
            if not future.done():
                future.set_result((indication, int(status or 0), int(index or 0), varbinds))

        try:
            addr_name, _params = self._lcd.configure(engine, peer.auth, transport, context)
            _send(engine, addr_name, context, pdu, done)
        except StatusInformation as info:
            raise _indication_error(info.get("errorIndication"), target) from None
        except PySnmpError as exc:
            raise SnmpError(
                f"{target.host}:{target.port}: request could not be sent ({type(exc).__name__})"
            ) from None
        indication, status, index, varbinds = await future
        if indication:
            raise _indication_error(indication, target)
        return status, index, list(varbinds)

    async def _get_engine(self) -> SnmpEngine:
        if self._engine is not None:
            return self._engine
        if self._engine_lock is None:
            self._engine_lock = asyncio.Lock()
        async with self._engine_lock:
            if self._engine is None:
                # Building the engine loads pysnmp's own MIB modules (~0.1 s of CPU): do it in a
                # thread so the loop keeps serving other jobs. Its transport is opened later,
                # on the loop, by the first request.
                self._engine = await asyncio.to_thread(SnmpEngine)
            return self._engine

    @staticmethod
    async def _resolve(target: SnmpTarget) -> tuple[tuple[str, int], bool]:
        """The agent's address (IPv4 preferred) and whether it is IPv6."""
        host = target.host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return (str(ip), target.port), ip.version == 6
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, target.port, type=socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise DeviceUnreachableError(
                f"cannot resolve host name {host!r}: {exc.args[-1] if exc.args else exc}"
            ) from None
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        if not infos:
            raise DeviceUnreachableError(f"host name {host!r} has no address")
        family, _type, _proto, _name, sockaddr = infos[0]
        return (str(sockaddr[0]), int(sockaddr[1])), family == socket.AF_INET6
