"""Walks of the Net-SNMP backend through `snmpbulkwalk`/`snmpwalk` child processes.

The walk tests of the contract suite (`test_snmp_driver.py`) run here again with a backend that
hands every subtree to the program from its first page (`program_after_pages=0`), against the
same real `snmpd`. The rest checks what only this path has: credentials kept off the command
line, the private `snmp.conf` and its removal, the child killed at the deadline and at the
limits, the hand-over between in-process pages and the program, the fallback without the
programs, IPv6, and agents that misbehave (a small GETBULK agent in this module, on loopback).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from pyasn1.codec.ber import decoder, encoder
from pydantic import JsonValue
from pysnmp.proto import api

from poller.drivers.snmp import SnmpDriver, SnmpOptions, parse_oid
from poller.drivers.snmp_netsnmp import NetsnmpBackend, _master_key
from poller.errors import DeviceAuthError, DeviceTimeoutError, OutputTooLargeError, SnmpError
from tests.integration.test_snmp_driver import (  # the contract's walk tests, collected again
    IF_TABLE,
    SYSTEM,
    by_oid,
    run,
    test_a_silent_agent_is_a_device_timeout_within_the_deadline,  # noqa: F401
    test_one_user_name_with_two_keys_at_once_gets_both_answers_right,  # noqa: F401
    test_v1_getnext_walk_and_v2c_bulk_walk_agree,  # noqa: F401
    test_v3_walk_with_privacy,  # noqa: F401
    test_walk_does_the_same_with_any_max_repetitions,  # noqa: F401
    test_walk_of_an_empty_subtree_is_empty,  # noqa: F401
    test_walk_of_several_roots_keeps_the_root_order,  # noqa: F401
    test_walk_of_system_is_in_order_and_in_the_subtree,  # noqa: F401
    test_walk_over_the_output_cap_keeps_partial_data,  # noqa: F401
    test_walk_past_the_end_of_the_mib_stops,  # noqa: F401
    test_walk_stops_at_max_varbinds_and_says_so,  # noqa: F401
    v1,
    v2c,
    v3,
    varbinds,
)
from tests.support.procs import read_cmdline
from tests.support.snmpd import Snmpd
from tests.support.udp_agents import DatagramAgents

pytestmark = pytest.mark.integration

MIB_2 = "1.3.6.1.2.1"
SYS_OR_TABLE = "1.3.6.1.2.1.1.9"
IF_DESCR = IF_TABLE + ".1.2"
FAKE_ROOT = "1.3.6.1.4.1.99999"


def _backend(after: int | None) -> NetsnmpBackend:
    backend = NetsnmpBackend(threads=8, program_after_pages=after)
    if backend.programs.bulk is None or backend.programs.next is None:
        pytest.fail("Net-SNMP's snmpbulkwalk/snmpwalk are not installed (apt-get install snmp)")
    return backend


def _driver(after: int | None, timeout: float = 1.0, retries: int = 1) -> SnmpDriver:
    options = SnmpOptions(timeout=timeout, retries=retries, backend="netsnmp")
    return SnmpDriver(options, backend=_backend(after))


@pytest.fixture
async def driver() -> AsyncIterator[SnmpDriver]:
    """Every subtree through the walk program, from its first page (the contract tests)."""
    drv = _driver(0)
    yield drv
    await drv.aclose()


@pytest.fixture
async def pages() -> AsyncIterator[SnmpDriver]:
    """Every walk page by page in-process, as without the programs."""
    drv = _driver(None)
    yield drv
    await drv.aclose()


@pytest.fixture
async def hybrid() -> AsyncIterator[SnmpDriver]:
    """The default: a few pages in-process, the rest of a long subtree in the program."""
    drv = SnmpDriver(SnmpOptions(timeout=1.0, retries=1, backend="netsnmp"))
    assert isinstance(drv.backend, NetsnmpBackend)
    assert drv.backend.program_after_pages == 4
    yield drv
    await drv.aclose()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A bound UDP port on 127.0.0.1 that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Watching the children


@dataclass
class Spawn:
    """One walk program as it was started, and what was on disk for it at that moment."""

    argv: list[str]
    env: dict[str, str]
    proc: asyncio.subprocess.Process
    cmdline: list[str] | None  # /proc/<pid>/cmdline (None: it had ended already, reaped or not)
    dir_mode: int
    conf_mode: int
    conf: str

    @property
    def directory(self) -> Path:
        return Path(self.env["SNMPCONFPATH"])


def _snapshot(argv: list[str], env: dict[str, str], proc: asyncio.subprocess.Process) -> Spawn:
    """What a just-started child shows: its /proc command line, its directory and conf."""
    directory = Path(env["SNMPCONFPATH"])
    cmdline = read_cmdline(proc.pid)
    conf = directory / "snmp.conf"
    return Spawn(
        argv=argv,
        env=dict(env),
        proc=proc,
        cmdline=cmdline,
        dir_mode=stat.S_IMODE(directory.stat().st_mode),
        conf_mode=stat.S_IMODE(conf.stat().st_mode),
        conf=conf.read_text(),
    )


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[Spawn]:
    """Records every child process started through asyncio during the test."""
    real = asyncio.create_subprocess_exec
    spawns: list[Spawn] = []

    async def spy(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real(*args, **kwargs)
        spawns.append(_snapshot([str(a) for a in args], kwargs["env"], proc))
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    return spawns


def oids(data: Any) -> list[str]:
    return [vb["oid"] for vb in varbinds(data)]


# --------------------------------------------------------------------------------------------
# A GETBULK/GETNEXT agent with faults on demand (SNMPv2c, community `public`)

P = api.PROTOCOL_MODULES[api.SNMP_VERSION_2C]


def fake_mib(count: int) -> list[tuple[tuple[int, ...], Any]]:
    """`count` objects under FAKE_ROOT with every SMI type, long binary strings among them."""
    values: list[Callable[[int], Any]] = [
        lambda n: P.Integer(-n),
        lambda n: P.OctetString(bytes((n * 7 + i) % 256 for i in range(n % 70))),
        lambda n: P.OctetString(f"port {n} text".encode()),
        P.Counter32,
        lambda n: P.Gauge32(n * 3),
        lambda n: P.TimeTicks(n * 100),
        lambda n: P.Counter64(2**64 - n),
        lambda n: P.IpAddress(f"10.{n % 256}.0.1"),
        lambda n: P.ObjectIdentifier((1, 3, 6, 1, 4, 1, n)),
        lambda n: P.Opaque(bytes([1, 2, n % 256])),
        lambda _n: P.Null(""),
    ]
    base = parse_oid(FAKE_ROOT)
    return [((*base, 1, n), values[n % len(values)](n)) for n in range(1, count + 1)]


class FakeAgent(asyncio.DatagramProtocol):
    """Answers GETNEXT/GETBULK from a sorted table; the faults are off unless set.

    `back_after`: after this OID an answer repeats it (a non-increasing OID);
    `error_from`: requests from this OID on get genErr (error-index 1);
    `too_big_over`: GETBULKs asking for more repetitions get tooBig (error-index 0);
    `empty_over`: GETBULKs asking for more repetitions get no varbinds and no error;
    `delay`: seconds before every answer.
    """

    def __init__(
        self,
        mib: list[tuple[tuple[int, ...], Any]],
        *,
        back_after: tuple[int, ...] | None = None,
        error_from: tuple[int, ...] | None = None,
        too_big_over: int | None = None,
        empty_over: int | None = None,
        delay: float = 0.0,
    ) -> None:
        self.mib = mib
        self.back_after = back_after
        self.error_from = error_from
        self.too_big_over = too_big_over
        self.empty_over = empty_over
        self.delay = delay
        self.requests = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.requests += 1
        msg, _ = decoder.decode(data, asn1Spec=P.Message())
        if str(P.apiMessage.get_community(msg)) != "public":
            return
        answer = encoder.encode(self._answer(msg))
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay, self._send, answer, addr)

    def _send(self, answer: bytes, addr: tuple[str | Any, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(answer, addr)

    def _answer(self, msg: Any) -> Any:
        pdu = P.apiMessage.get_pdu(msg)
        response = P.apiMessage.get_response(msg)
        rpdu = P.apiMessage.get_pdu(response)
        start = tuple(P.apiPDU.get_varbinds(pdu)[0][0])
        bulk = pdu.isSameTypeWith(P.GetBulkRequestPDU())
        reps = int(P.apiBulkPDU.get_max_repetitions(pdu)) if bulk else 1
        if self.error_from is not None and start >= self.error_from:
            P.apiPDU.set_error_status(rpdu, 5)
            P.apiPDU.set_error_index(rpdu, 1)
            P.apiPDU.set_varbinds(rpdu, [(start, P.Null(""))])
            return response
        if self.too_big_over is not None and reps > self.too_big_over:
            P.apiPDU.set_error_status(rpdu, 1)
            P.apiPDU.set_error_index(rpdu, 0)
            P.apiPDU.set_varbinds(rpdu, [(start, P.Null(""))])
            return response
        if self.empty_over is not None and reps > self.empty_over:
            P.apiPDU.set_varbinds(rpdu, [])
            return response
        rows = [(oid, value) for oid, value in self.mib if oid > start][:reps]
        if self.back_after is not None:
            for i, (oid, value) in enumerate(rows):
                if oid == self.back_after:
                    rows = [*rows[: i + 1], (oid, value)]
                    break
        if not rows:
            rows = [(start, P.EndOfMibView(""))]
        P.apiPDU.set_varbinds(rpdu, rows)
        return response


@pytest.fixture
async def fake_agent() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Starts FakeAgents on 127.0.0.1; returns the port of each."""
    agents = DatagramAgents()

    async def start(mib: list[tuple[tuple[int, ...], Any]], **faults: Any) -> int:
        return await agents.start(lambda: FakeAgent(mib, **faults))

    yield start
    agents.close()


PUBLIC: dict[str, JsonValue] = {"version": "2c", "community": "public"}


# --------------------------------------------------------------------------------------------
# Same result as the page-by-page walk


async def test_every_type_renders_byte_for_byte_as_the_page_walk(
    driver: SnmpDriver,
    pages: SnmpDriver,
    hybrid: SnmpDriver,
    fake_agent: Callable[..., Awaitable[int]],
) -> None:
    port = await fake_agent(fake_mib(300))
    params: dict[str, JsonValue] = {"oids": [FAKE_ROOT], "max_repetitions": 7}
    expected = await run(pages, "snmp.walk", params, PUBLIC, port=port)
    assert len(varbinds(expected)) == 300
    assert {vb["type"] for vb in varbinds(expected)} >= {"OctetString", "Opaque", "Null"}
    assert await run(driver, "snmp.walk", params, PUBLIC, port=port) == expected
    assert await run(hybrid, "snmp.walk", params, PUBLIC, port=port) == expected


@pytest.mark.parametrize("version", ["1", "2c", "3"])
async def test_real_agent_walks_agree_with_the_page_walk(
    driver: SnmpDriver, pages: SnmpDriver, snmpd: Snmpd, version: str
) -> None:
    auth = {"1": v1(snmpd), "2c": v2c(snmpd), "3": v3(snmpd.v3_users["sha512-aes256"])}[version]
    params: dict[str, JsonValue] = {"oids": [SYS_OR_TABLE, IF_DESCR], "max_repetitions": 3}
    expected = await run(pages, "snmp.walk", params, auth, port=snmpd.port)
    assert len(varbinds(expected)) > 10
    assert await run(driver, "snmp.walk", params, auth, port=snmpd.port) == expected


async def test_a_long_walk_goes_to_the_program_and_a_short_one_stays_in_process(
    hybrid: SnmpDriver,
    pages: SnmpDriver,
    snmpd: Snmpd,
    fake_agent: Callable[..., Awaitable[int]],
    spawned: list[Spawn],
) -> None:
    short = await run(hybrid, "snmp.walk", {"oids": [SYSTEM]}, v2c(snmpd), port=snmpd.port)
    assert len(varbinds(short)) > 20
    assert spawned == []
    # max-repetitions 3: pages 1-4 in-process, the rest in the program, joined without a seam
    params: dict[str, JsonValue] = {"oids": [SYS_OR_TABLE, IF_DESCR], "max_repetitions": 3}
    joined = await run(hybrid, "snmp.walk", params, v2c(snmpd), port=snmpd.port)
    assert [s.argv[-1] for s in spawned] == ["." + SYS_OR_TABLE]
    assert joined == await run(pages, "snmp.walk", params, v2c(snmpd), port=snmpd.port)
    spawned.clear()
    # A long subtree of a known size: the agent's mib-2 holds this machine's TCP and UDP tables,
    # tens of thousands of rows while other test runs share the machine (past the output cap).
    port = await fake_agent(fake_mib(3000))
    long = await run(hybrid, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port, timeout=30)
    assert len(spawned) == 1
    assert "-Cr25" in spawned[0].argv
    walked = [parse_oid(oid) for oid in oids(long)]
    assert len(walked) == 3000
    assert walked == sorted(set(walked))
    assert long["truncated"] is False


# --------------------------------------------------------------------------------------------
# Credentials: never on the command line, in a private file only while the walk runs


def _assert_private(spawn: Spawn, *secrets: str) -> None:
    assert spawn.dir_mode == 0o700
    assert spawn.conf_mode == 0o600
    assert set(spawn.env) == {"SNMPCONFPATH", "SNMP_PERSISTENT_DIR", "MIBDIRS", "MIBS", "HOME"}
    if spawn.cmdline is not None:
        assert spawn.cmdline == spawn.argv
    for secret in secrets:
        assert secret not in " ".join(spawn.argv)
        assert all(secret not in value for value in spawn.env.values())
    assert not spawn.directory.exists()  # removed when the walk ended


async def test_v2c_community_is_only_in_the_private_conf(
    driver: SnmpDriver, snmpd: Snmpd, spawned: list[Spawn]
) -> None:
    data = await run(driver, "snmp.walk", {"oids": [SYSTEM]}, v2c(snmpd), port=snmpd.port)
    assert len(varbinds(data)) > 20
    [spawn] = spawned
    assert f'defCommunity "{snmpd.community}"' in spawn.conf
    _assert_private(spawn, snmpd.community)
    assert spawn.argv[0].endswith("/snmpbulkwalk")


async def test_v3_keys_are_only_in_the_private_conf_and_only_as_master_keys(
    driver: SnmpDriver, snmpd: Snmpd, spawned: list[Spawn]
) -> None:
    user = snmpd.v3_users["sha256-aes192"]
    assert user.auth_key is not None
    assert user.priv_key is not None
    data = await run(driver, "snmp.walk", {"oids": [SYSTEM]}, v3(user), port=snmpd.port)
    assert len(varbinds(data)) > 20
    [spawn] = spawned
    auth_master = _master_key("sha256", user.auth_key)
    priv_master = _master_key("sha256", user.priv_key)
    assert f"defAuthMasterKey 0x{auth_master}" in spawn.conf
    assert f"defPrivMasterKey 0x{priv_master}" in spawn.conf
    assert user.auth_key not in spawn.conf
    _assert_private(spawn, user.auth_key, user.priv_key, auth_master, priv_master)


async def test_v1_walks_through_snmpwalk(
    driver: SnmpDriver, snmpd: Snmpd, spawned: list[Spawn]
) -> None:
    data = await run(driver, "snmp.walk", {"oids": [SYSTEM]}, v1(snmpd), port=snmpd.port)
    assert len(varbinds(data)) > 20
    [spawn] = spawned
    assert spawn.argv[0].endswith("/snmpwalk")
    assert "defVersion 1" in spawn.conf
    _assert_private(spawn, snmpd.community)


# --------------------------------------------------------------------------------------------
# Failures through the program


async def test_wrong_v3_auth_key_is_auth_failed(driver: SnmpDriver, snmpd: Snmpd) -> None:
    user = snmpd.v3_users["sha-aes"]
    with pytest.raises(DeviceAuthError, match="wrong SNMPv3 auth key") as info:
        await run(
            driver,
            "snmp.walk",
            {"oids": [SYSTEM]},
            v3(user, auth_key="wrong-key-1"),
            port=snmpd.port,
        )
    assert "wrong-key-1" not in str(info.value)
    with pytest.raises(DeviceAuthError, match="does not know this SNMPv3 user"):
        await run(
            driver, "snmp.walk", {"oids": [SYSTEM]}, v3(user, user="nobody-x"), port=snmpd.port
        )


async def test_wrong_v3_priv_key_is_a_device_timeout(driver: SnmpDriver, snmpd: Snmpd) -> None:
    user = snmpd.v3_users["sha-aes"]
    start = time.monotonic()
    with pytest.raises(DeviceTimeoutError):
        await run(
            driver,
            "snmp.walk",
            {"oids": [SYSTEM]},
            v3(user, priv_key="wrong-priv-1"),
            port=snmpd.port,
            timeout=1.0,
        )
    assert time.monotonic() - start <= 1.2


async def test_the_deadline_kills_the_child_and_keeps_what_it_gathered(
    fake_agent: Callable[..., Awaitable[int]], spawned: list[Spawn]
) -> None:
    port = await fake_agent(fake_mib(5000), delay=0.05)  # 20 pages/s: longer than the job
    drv = _driver(0, timeout=1.0, retries=1)
    start = time.monotonic()
    try:
        with pytest.raises(DeviceTimeoutError, match="before the job deadline") as info:
            await run(drv, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port, timeout=1.5)
    finally:
        await drv.aclose()
    assert time.monotonic() - start <= 1.5 * 1.2
    [spawn] = spawned
    assert spawn.proc.returncode == -signal.SIGKILL
    assert _gone(spawn.proc.pid)
    assert not spawn.directory.exists()
    assert info.value.data is not None
    gathered = varbinds(info.value.data)
    assert 25 <= len(gathered) < 5000
    assert [vb["oid"] for vb in gathered] == [
        f"{FAKE_ROOT}.1.{n}" for n in range(1, len(gathered) + 1)
    ]


async def test_max_varbinds_stops_the_child(
    driver: SnmpDriver, pages: SnmpDriver, snmpd: Snmpd, spawned: list[Spawn]
) -> None:
    params: dict[str, JsonValue] = {"oids": [MIB_2], "max_varbinds": 300}
    cut = await run(driver, "snmp.walk", params, v2c(snmpd), port=snmpd.port)
    assert cut["truncated"] is True
    assert len(varbinds(cut)) == 300
    assert oids(cut) == oids(await run(pages, "snmp.walk", params, v2c(snmpd), port=snmpd.port))
    [spawn] = spawned
    assert spawn.proc.returncode is not None
    assert not spawn.directory.exists()


async def test_max_varbinds_equal_to_the_subtree_is_not_truncated(
    driver: SnmpDriver, fake_agent: Callable[..., Awaitable[int]]
) -> None:
    port = await fake_agent(fake_mib(120))
    for limit, truncated in ((120, False), (119, True)):
        data = await run(
            driver,
            "snmp.walk",
            {"oids": [FAKE_ROOT, "1.3.6.1.4.1.99998"], "max_varbinds": limit},
            PUBLIC,
            port=port,
        )
        assert (len(varbinds(data)), data["truncated"]) == (limit, truncated)


async def test_the_output_cap_stops_the_child_with_partial_data(
    driver: SnmpDriver, snmpd: Snmpd, spawned: list[Spawn]
) -> None:
    with pytest.raises(OutputTooLargeError) as info:
        await run(
            driver,
            "snmp.walk",
            {"oids": [MIB_2]},
            v2c(snmpd),
            port=snmpd.port,
            max_output_bytes=64 * 1024,
        )
    assert info.value.data is not None
    partial = varbinds(info.value.data)
    assert 300 < len(partial) < 1000
    assert partial[0]["oid"] == "1.3.6.1.2.1.1.1.0"
    [spawn] = spawned
    assert spawn.proc.returncode is not None
    assert not spawn.directory.exists()


async def test_a_non_increasing_oid_is_an_snmp_error_with_the_same_data_as_page_by_page(
    driver: SnmpDriver, pages: SnmpDriver, fake_agent: Callable[..., Awaitable[int]]
) -> None:
    mib = fake_mib(200)
    port = await fake_agent(mib, back_after=mib[149][0])
    errors = []
    for drv in (pages, driver):
        with pytest.raises(
            SnmpError, match=f"non-increasing OID after .* while walking {FAKE_ROOT}"
        ) as info:
            await run(drv, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port)
        errors.append(info.value)
    assert errors[0].data is not None
    assert len(varbinds(errors[0].data)) == 150
    assert errors[1].data == errors[0].data


async def test_an_error_status_is_reported_as_page_by_page(
    driver: SnmpDriver, pages: SnmpDriver, fake_agent: Callable[..., Awaitable[int]]
) -> None:
    mib = fake_mib(200)
    port = await fake_agent(mib, error_from=mib[120][0])
    errors = []
    for drv in (pages, driver):
        with pytest.raises(SnmpError, match="agent answered genErr for varbind 1") as info:
            await run(drv, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port)
        errors.append(info.value)
    assert errors[1].message == errors[0].message
    assert errors[1].data == errors[0].data
    assert errors[0].data is not None
    assert len(varbinds(errors[0].data)) >= 121


async def test_exception_values_inside_a_subtree_do_not_end_it(
    driver: SnmpDriver, pages: SnmpDriver, fake_agent: Callable[..., Awaitable[int]]
) -> None:
    """`snmpbulkwalk` stops at noSuchObject/noSuchInstance; the walk goes on as page by page."""
    mib = fake_mib(80)
    mib[20] = (mib[20][0], P.NoSuchObject(""))
    mib[50] = (mib[50][0], P.NoSuchInstance(""))
    port = await fake_agent(mib)
    expected = await run(pages, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port)
    assert len(varbinds(expected)) == 80
    assert [vb["type"] for vb in varbinds(expected)][20::30] == ["noSuchObject", "noSuchInstance"]
    assert await run(driver, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port) == expected


async def test_too_big_hands_back_and_halves_max_repetitions(
    driver: SnmpDriver, pages: SnmpDriver, fake_agent: Callable[..., Awaitable[int]]
) -> None:
    port = await fake_agent(fake_mib(100), too_big_over=6)
    expected = await run(pages, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port)
    assert len(varbinds(expected)) == 100
    assert await run(driver, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port) == expected


async def test_a_program_going_round_in_circles_hands_back_to_the_page_walk(
    fake_agent: Callable[..., Awaitable[int]], spawned: list[Spawn]
) -> None:
    """An empty GETBULK answer: `snmpbulkwalk` asks again forever, the page walk halves."""
    port = await fake_agent(fake_mib(60), empty_over=6)
    pages, program = _driver(None, timeout=0.2, retries=0), _driver(0, timeout=0.2, retries=0)
    try:
        expected = await run(pages, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port)
        start = time.monotonic()
        got = await run(program, "snmp.walk", {"oids": [FAKE_ROOT]}, PUBLIC, port=port)
        took = time.monotonic() - start
    finally:
        await pages.aclose()
        await program.aclose()
    assert len(varbinds(expected)) == 60
    assert got == expected
    assert 1.4 <= took < 4.0  # no output for 2 x 0.2 s + 1 s: killed, then page by page
    [spawn] = spawned
    assert spawn.proc.returncode == -signal.SIGKILL


# --------------------------------------------------------------------------------------------
# Without the programs, and over IPv6


async def test_without_the_programs_walks_stay_in_process(
    snmpd: Snmpd,
    spawned: list[Spawn],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no snmpbulkwalk on PATH
    backend = NetsnmpBackend(threads=4, program_after_pages=0)
    assert (backend.programs.bulk, backend.programs.next) == (None, None)
    drv = SnmpDriver(SnmpOptions(timeout=1.0, retries=1, backend="netsnmp"), backend=backend)
    try:
        for auth in (v1(snmpd), v2c(snmpd)):
            data = await run(drv, "snmp.walk", {"oids": [INTERFACES_ROOT]}, auth, port=snmpd.port)
            assert len(varbinds(data)) > 20
    finally:
        await drv.aclose()
    assert spawned == []


INTERFACES_ROOT = "1.3.6.1.2.1.2"


class _Relay(asyncio.DatagramProtocol):
    """Forwards datagrams from [::1] to the IPv4 agent and the answers back."""

    def __init__(self, agent: tuple[str, int]) -> None:
        self.agent = agent
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: dict[Any, asyncio.DatagramTransport] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        upstream = self.upstream.get(addr)
        if upstream is not None:
            upstream.sendto(data, self.agent)
            return
        asyncio.get_running_loop().create_task(self._open(data, addr))

    async def _open(self, data: bytes, addr: Any) -> None:
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, answer: bytes, _addr: Any) -> None:
                if relay.transport is not None:
                    relay.transport.sendto(answer, addr)

        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_datagram_endpoint(Back, local_addr=("127.0.0.1", 0))
        self.upstream[addr] = upstream
        upstream.sendto(data, self.agent)

    def close(self) -> None:
        for upstream in self.upstream.values():
            upstream.close()
        if self.transport is not None:
            self.transport.close()


async def test_ipv6_agents_are_walked_through_the_program(
    driver: SnmpDriver, snmpd: Snmpd, spawned: list[Spawn]
) -> None:
    loop = asyncio.get_running_loop()
    try:
        transport, relay = await loop.create_datagram_endpoint(
            lambda: _Relay((snmpd.host, snmpd.port)), local_addr=("::1", 0)
        )
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    port = transport.get_extra_info("sockname")[1]
    try:
        params: dict[str, JsonValue] = {"oids": [IF_DESCR, SYS_OR_TABLE]}
        over_v6 = await run(driver, "snmp.walk", params, v2c(snmpd), host="::1", port=port)
        over_v4 = await run(driver, "snmp.walk", params, v2c(snmpd), port=snmpd.port)
    finally:
        relay.close()
    assert over_v6 == over_v4
    assert len(by_oid(over_v6)) > 10
    assert spawned[0].argv[-2] == f"udp6:[::1]:{port}"
