"""The Net-SNMP backend's open sessions against its ezsnmp path: the same answer, every time.

Plain SNMPv1/v2c GETs go through Net-SNMP sessions kept open (`snmp_netsnmp_open`) unless
`open_sessions=0`. Differential tests: every OID the test agent serves, GET through both paths,
must render identically (values that change between two requests, such as sysUpTime and
counters, are asked again until both paths read the same moment); and every error case (v1
noSuchName, error-status with and without an index, tooBig, a wrong community, a silent port,
the deadline) must give the same error, message and partial data. A GET agent of the test's own
serves the values snmpd has none of (negative integers, Counter64 at its maximum, Opaque
doubles, strings with NULs) and the faults on demand. Cases the open session hands to ezsnmp
(types or error statuses it does not handle) are checked to be handed over.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from pyasn1.codec.ber import decoder, encoder
from pydantic import JsonValue
from pysnmp.proto import api

from poller.drivers.snmp import SnmpDriver, SnmpOptions
from poller.drivers.snmp_netsnmp import NetsnmpBackend
from poller.drivers.snmp_netsnmp_open import OpenSessions
from poller.errors import JobError
from tests.integration.test_snmp_driver import run, v1, v2c, varbinds
from tests.support.snmpd import Snmpd
from tests.support.udp_agents import DatagramAgents

pytestmark = pytest.mark.integration

P = api.PROTOCOL_MODULES[api.SNMP_VERSION_2C]
#: Counters of the agent's own SNMP traffic: every request changes them, so two requests never
#: read the same value (their type is still compared).
SELF_COUNTING = ("1.3.6.1.2.1.11.", "1.3.6.1.6.3.")
FAKE = (1, 3, 6, 1, 4, 1, 99998)


@pytest.fixture
async def paths() -> AsyncIterator[tuple[SnmpDriver, SnmpDriver]]:
    """(open sessions, ezsnmp only): two drivers on the netsnmp backend."""
    drivers = (
        SnmpDriver(SnmpOptions(timeout=1.0, retries=1, backend="netsnmp", open_sessions=4)),
        SnmpDriver(SnmpOptions(timeout=1.0, retries=1, backend="netsnmp", open_sessions=0)),
    )
    yield drivers
    for drv in drivers:
        await drv.aclose()


def sessions(driver: SnmpDriver) -> OpenSessions:
    backend = driver.backend
    assert isinstance(backend, NetsnmpBackend)
    assert backend.sessions is not None, "netsnmp-cffi did not load"
    return backend.sessions


def handled(driver: SnmpDriver) -> int:
    backend = driver.backend
    assert isinstance(backend, NetsnmpBackend)
    return backend.sessions.handled if backend.sessions is not None else 0


async def outcome(driver: SnmpDriver, oids: list[str], auth: Any, port: int, **kw: Any) -> Any:
    """The job's data, or its error as (class, code, message, data)."""
    params: dict[str, JsonValue] = {"oids": cast(list[JsonValue], oids)}
    try:
        return await run(driver, "snmp.get", params, auth, port=port, **kw)
    except JobError as exc:
        return (type(exc).__name__, exc.code, str(exc), exc.data)


async def same(
    paths: tuple[SnmpDriver, SnmpDriver], oids: list[str], auth: Any, port: int, **kw: Any
) -> Any:
    """GET `oids` through both paths and assert the same outcome; that outcome.

    Values that change between two requests (uptime, counters, load) are asked again, both
    paths back to back, until they read the same moment (a real difference never converges).
    """
    fast, slow = paths
    first = await outcome(fast, oids, auth, port, **kw)
    other = await outcome(slow, oids, auth, port, **kw)
    if first == other:
        return first
    assert isinstance(first, dict), (first, other)
    assert isinstance(other, dict), (first, other)
    left, right = varbinds(first), varbinds(other)
    assert [(vb["oid"], vb["type"]) for vb in left] == [(vb["oid"], vb["type"]) for vb in right]
    moving = [
        vb["oid"]
        for vb, ob in zip(left, right, strict=True)
        if vb != ob and not vb["oid"].startswith(SELF_COUNTING)
    ]
    if not moving:
        return first
    for _attempt in range(20):
        a = varbinds(await outcome(fast, moving, auth, port, **kw))
        b = varbinds(await outcome(slow, moving, auth, port, **kw))
        moving = [x["oid"] for x, y in zip(a, b, strict=True) if x != y]
        if not moving:
            return first
    pytest.fail(f"the two paths keep rendering these differently: {moving} ({a} != {b})")


# --------------------------------------------------------------------------------------------
# Every OID of the test agent


async def test_every_oid_of_the_agent_renders_the_same_on_both_paths(
    paths: tuple[SnmpDriver, SnmpDriver], snmpd: Snmpd
) -> None:
    fast, slow = paths
    walked = await run(
        slow,
        "snmp.walk",
        {"oids": ["1.3.6"], "max_varbinds": 20_000},
        v2c(snmpd),
        port=snmpd.port,
        timeout=60.0,
    )
    oids = [vb["oid"] for vb in varbinds(walked)]
    assert len(oids) > 500  # mib-2, host resources, UCD, Net-SNMP's own
    types = {vb["type"] for vb in varbinds(walked)}
    assert {"OctetString", "ObjectIdentifier", "TimeTicks", "Integer", "Gauge32"} <= types
    assert {"Counter32", "Counter64", "IpAddress", "Opaque"} <= types
    before = handled(fast)
    for start in range(0, len(oids), 50):
        chunk = oids[start : start + 50]
        got = await same(paths, chunk, v2c(snmpd), snmpd.port, timeout=10.0)
        assert [vb["oid"] for vb in varbinds(got)] == chunk
    assert handled(fast) - before >= len(oids) // 50  # on open sessions, not handed over
    # SNMPv1: the same OIDs (Counter64 has no v1 form: those PDUs are noSuchName errors).
    errors = 0
    for start in range(0, len(oids), 50):
        got = await same(paths, oids[start : start + 50], v1(snmpd), snmpd.port, timeout=10.0)
        errors += isinstance(got, tuple)
    assert errors  # Counter64s are there: v1 errors were compared too
    assert 1 <= sessions(fast).opened <= 2 * 32  # v1 and v2c, per pool thread at most


async def test_missing_objects_and_instances_are_the_same(
    paths: tuple[SnmpDriver, SnmpDriver], snmpd: Snmpd
) -> None:
    oids = ["1.3.6.1.2.1.1.5.0", "1.3.6.1.2.1.1.99.0", "1.3.6.1.2.1.1.5.1", "1.3.6.1.99"]
    got = await same(paths, oids, v2c(snmpd), snmpd.port)
    assert [vb["type"] for vb in varbinds(got)] == [
        "OctetString",
        "noSuchObject",
        "noSuchInstance",
        "noSuchObject",
    ]
    error = await same(paths, oids, v1(snmpd), snmpd.port)
    assert error[:2] == ("SnmpError", "snmp_error")
    assert "agent answered noSuchName for varbind" in error[2]
    # 210 OIDs in 4 PDUs, in order, and the private community's view (system group only).
    many = [f"1.3.6.1.2.1.1.{n}.0" for n in range(1, 8)] * 30
    assert len(varbinds(await same(paths, many, v2c(snmpd), snmpd.port))) == 210
    private = await same(paths, ["1.3.6.1.2.1.2.1.0"], v2c(snmpd, "private"), snmpd.port)
    assert varbinds(private)[0]["type"] == "noSuchObject"


# --------------------------------------------------------------------------------------------
# Timeouts


async def test_a_wrong_community_and_a_silent_port_time_out_the_same(
    paths: tuple[SnmpDriver, SnmpDriver], snmpd: Snmpd, silent_port: int
) -> None:
    fast, _ = paths
    before = handled(fast)
    wrong = await same(paths, ["1.3.6.1.2.1.1.5.0"], v2c(snmpd, "wrong"), snmpd.port)
    assert wrong[:2] == ("DeviceTimeoutError", "device_timeout")
    assert "a wrong community looks the same as a dead device" in wrong[2]
    for auth in (v1(snmpd), v2c(snmpd)):
        silent = await same(paths, ["1.3.6.1.2.1.1.5.0"], auth, silent_port, timeout=0.5)
        assert silent[:2] == ("DeviceTimeoutError", "device_timeout")
    assert handled(fast) - before == 3


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A UDP port that is bound (no ICMP port unreachable) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# --------------------------------------------------------------------------------------------
# An agent of our own: the values snmpd has none of, and faults on demand


def fake_values() -> dict[tuple[int, ...], Any]:
    opaque_double = b"\x9f\x79\x08" + struct.pack(">d", -2.5)
    opaque_float = b"\x9f\x78\x04" + struct.pack(">f", 0.3828125)
    values = [
        P.Integer(-(2**31)),
        P.Integer(2**31 - 1),
        P.Integer(0),
        P.OctetString(b""),
        P.OctetString(b"text\x00"),
        P.OctetString(bytes(range(256))),
        P.OctetString("grüße\ttab".encode()),
        P.Counter32(2**32 - 1),
        P.Gauge32(0),
        P.TimeTicks(2**32 - 1),
        P.Counter64(2**64 - 1),
        P.Counter64(0),
        P.IpAddress("255.0.10.1"),
        P.ObjectIdentifier((1, 3, 6, 1, 4, 1, 2**32 - 1)),
        P.ObjectIdentifier((0, 0)),
        P.Opaque(b""),
        P.Opaque(b"\x01\x02\x03"),
        P.Opaque(opaque_float),
        P.Opaque(opaque_double),
        P.Null(""),
    ]
    return {(*FAKE, 1, n): value for n, value in enumerate(values, start=1)}


#: Values the open sessions hand to ezsnmp: an Opaque I64 (Net-SNMP decodes it to a type they
#: do not read) and an Opaque float NaN (C prints its sign, Python does not).
HANDED_OVER: dict[tuple[int, ...], bytes] = {
    (*FAKE, 2, 1): b"\x9f\x7a\x01\x05",
    (*FAKE, 2, 2): b"\x9f\x78\x04" + struct.pack(">f", float("nan")),
}


class GetAgent(asyncio.DatagramProtocol):
    """Answers v1/v2c GETs from `values` (noSuchObject for others, noSuchName on v1).

    `too_big_over`: PDUs with more varbinds get tooBig (error-index 0);
    `errors`: OID → (error-status, error-index) answered when the request holds that OID.
    """

    def __init__(
        self,
        values: dict[tuple[int, ...], Any],
        *,
        too_big_over: int | None = None,
        errors: dict[tuple[int, ...], tuple[int, int]] | None = None,
    ) -> None:
        self.values = values
        self.too_big_over = too_big_over
        self.errors = errors or {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        version = int(api.decodeMessageVersion(data))
        proto = api.PROTOCOL_MODULES[version]
        msg, _ = decoder.decode(data, asn1Spec=proto.Message())
        if str(proto.apiMessage.get_community(msg)) != "public" or self.transport is None:
            return
        pdu = proto.apiMessage.get_pdu(msg)
        response = proto.apiMessage.get_response(msg)
        rpdu = proto.apiMessage.get_pdu(response)
        asked = [tuple(oid) for oid, _ in proto.apiPDU.get_varbinds(pdu)]
        rows: list[tuple[tuple[int, ...], Any]] = []
        status, index = 0, 0
        for oid in asked:
            if oid in self.errors:
                status, index = self.errors[oid]
            value = self.values.get(oid)
            if value is None and oid in HANDED_OVER:
                value = P.Opaque(HANDED_OVER[oid])
            if value is None:
                if version == api.SNMP_VERSION_1:
                    status, index = status or 2, index or asked.index(oid) + 1
                value = P.NoSuchObject("")
            rows.append((oid, value))
        if self.too_big_over is not None and len(asked) > self.too_big_over:
            status, index = 1, 0
        if status:
            rows = [(oid, P.Null("")) for oid in asked]
            proto.apiPDU.set_error_status(rpdu, status)
            proto.apiPDU.set_error_index(rpdu, index)
        if version == api.SNMP_VERSION_1:
            rows = [(oid, P.Null("") if isinstance(v, P.NoSuchObject) else v) for oid, v in rows]
        proto.apiPDU.set_varbinds(rpdu, rows)
        self.transport.sendto(encoder.encode(response), addr)


@pytest.fixture
async def get_agent() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    agents = DatagramAgents()

    async def start(host: str = "127.0.0.1", **faults: Any) -> int:
        return await agents.start(lambda: GetAgent(fake_values(), **faults), host)

    yield start
    agents.close()


PUBLIC: dict[str, JsonValue] = {"version": "2c", "community": "public"}
PUBLIC_V1: dict[str, JsonValue] = {"version": "1", "community": "public"}


def dotted(oid: tuple[int, ...]) -> str:
    return ".".join(map(str, oid))


async def test_every_type_and_edge_value_renders_the_same(
    paths: tuple[SnmpDriver, SnmpDriver], get_agent: Callable[..., Awaitable[int]]
) -> None:
    fast, _ = paths
    port = await get_agent()
    oids = [dotted(oid) for oid in fake_values()]
    before = handled(fast)
    got = await same(paths, oids, PUBLIC, port)
    assert handled(fast) - before == 1
    rendered = varbinds(got)
    assert [vb["type"] for vb in rendered[:3]] == ["Integer"] * 3
    assert rendered[0]["value"] == -(2**31)
    assert rendered[10] == {"oid": oids[10], "type": "Counter64", "value": 2**64 - 1}
    assert rendered[4]["value"] is None
    assert rendered[4]["hex"] == "7465787400"
    assert rendered[13]["value"] == "1.3.6.1.4.1.4294967295"
    # Net-SNMP prints an Opaque float with 6 decimals; both paths re-encode that text. It prints
    # a double as "Opaque: Float: -2.500000" too: ezsnmp's path reads a float, and so does this.
    assert rendered[17]["hex"] == "9f7804" + struct.pack(">f", float("0.382812")).hex()
    assert rendered[18]["hex"] == "9f7804" + struct.pack(">f", -2.5).hex()
    values = fake_values().values()
    v1_oids = [o for o, v in zip(oids, values, strict=True) if not isinstance(v, P.Counter64)]
    assert len(varbinds(await same(paths, v1_oids, PUBLIC_V1, port))) == len(v1_oids)


async def test_ipv6_agents_are_asked_on_open_sessions_too(
    paths: tuple[SnmpDriver, SnmpDriver], get_agent: Callable[..., Awaitable[int]]
) -> None:
    fast, _ = paths
    try:
        port = await get_agent("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    oids = [dotted(oid) for oid in fake_values()]
    before = handled(fast)
    for host in ("::1", "[::1]"):
        got = await same(paths, oids, PUBLIC, port, host=host)
        assert len(varbinds(got)) == len(oids)
    assert handled(fast) - before == 2


async def test_values_it_does_not_decode_are_handed_to_ezsnmp(
    paths: tuple[SnmpDriver, SnmpDriver], get_agent: Callable[..., Awaitable[int]]
) -> None:
    fast, _ = paths
    port = await get_agent()
    for oid in HANDED_OVER:
        before = handled(fast)
        got = await same(paths, [dotted((*FAKE, 1, 1)), dotted(oid)], PUBLIC, port)
        assert handled(fast) == before  # the whole request went through ezsnmp
        assert [vb["type"] for vb in varbinds(got)] == ["Integer", "Opaque"]


async def test_error_statuses_are_the_same(
    paths: tuple[SnmpDriver, SnmpDriver], get_agent: Callable[..., Awaitable[int]]
) -> None:
    fast, _ = paths
    first, second = (*FAKE, 1, 1), (*FAKE, 1, 2)
    cases = {
        "genErr at 2": ((5, 2), True),
        "genErr without an index": ((5, 0), True),
        "noAccess at 1": ((6, 1), True),
        "inconsistentName at 2": ((18, 2), True),
        "an index past the varbinds": ((5, 7), False),  # handed to ezsnmp
        "an unknown error-status": ((42, 1), False),  # handed to ezsnmp
    }
    for name, ((status, index), on_open_session) in cases.items():
        port = await get_agent(errors={second: (status, index)})
        before = handled(fast)
        for auth in (PUBLIC, PUBLIC_V1):
            got = await same(paths, [dotted(first), dotted(second)], auth, port)
            assert isinstance(got, tuple), (name, got)
            assert got[:2] == ("SnmpError", "snmp_error"), (name, got)
        assert (handled(fast) - before == 2) is on_open_session, name


async def test_too_big_halves_the_pdu_the_same(
    paths: tuple[SnmpDriver, SnmpDriver], get_agent: Callable[..., Awaitable[int]]
) -> None:
    fast, _ = paths
    port = await get_agent(too_big_over=3)
    oids = [dotted(oid) for oid in fake_values()]
    before = handled(fast)
    got = await same(paths, oids, PUBLIC, port)
    assert [vb["oid"] for vb in varbinds(got)] == oids
    assert handled(fast) - before > 6  # tooBig, then halves, all on the open session
    single = await get_agent(too_big_over=0)
    error = await same(paths, [oids[0]], PUBLIC, single)
    assert error[:2] == ("SnmpError", "snmp_error")
    assert "tooBig" in error[2]


async def test_sessions_are_kept_per_thread_bounded_and_closed(
    get_agent: Callable[..., Awaitable[int]],
) -> None:
    """One session per (agent, version, community) and thread, at most `open_sessions` per
    thread (the least recently used closed first), all closed when the backend closes."""
    backend = NetsnmpBackend(threads=1, open_sessions=2)
    driver = SnmpDriver(SnmpOptions(timeout=1.0, retries=1, backend="netsnmp"), backend=backend)
    ports = [await get_agent() for _ in range(3)]
    oid = [dotted((*FAKE, 1, 1))]

    def sockets() -> int:
        """This process's sockets."""
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if _readlink(fd).startswith("socket:"))

    await outcome(driver, oid, PUBLIC_V1, ports[2])  # the process's set-up opens its own
    before = sockets() - 1  # less the session of that request
    try:
        for port in ports[:2] * 3:
            await outcome(driver, oid, PUBLIC, port)
        assert backend.sessions is not None
        assert backend.sessions.opened == 3  # kept and used again
        assert sockets() - before == 2
        await outcome(driver, oid, PUBLIC_V1, ports[0])  # another version: another session
        await outcome(driver, oid, PUBLIC, ports[2])
        assert backend.sessions.opened == 5
        assert sockets() - before == 2  # the least recently used were closed
        assert backend.sessions.handled == 9
    finally:
        await driver.aclose()
    for _ in range(100):  # the pool's thread closes its sessions as it stops
        if sockets() == before:
            break
        await asyncio.sleep(0.05)
    assert sockets() == before


def _readlink(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:  # closed meanwhile
        return ""
