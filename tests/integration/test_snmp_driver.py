"""The SNMP driver against a real Net-SNMP snmpd on loopback (see tests/support/snmpd.py).

One contract suite for both backends: the `driver` fixture is parametrized over `BACKENDS`, so
every behaviour test runs against pysnmp and against Net-SNMP (ezsnmp) with the same assertions.
Where the backends differ on purpose (docs/drivers/snmp.md, "Backends"), a test asserts the
documented difference for each.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import pytest
from pydantic import JsonValue

from poller.drivers.base import Data, JobContext
from poller.drivers.snmp import SnmpDriver, SnmpOptions, parse_oid
from poller.errors import (
    DeviceAuthError,
    DeviceTimeoutError,
    DeviceUnreachableError,
    JobError,
    OutputTooLargeError,
    SnmpError,
)
from poller.wire import SnmpGetJob, SnmpGetNextJob, SnmpSetJob, SnmpWalkJob
from tests.support.snmpd import V3_USERS, Snmpd, V3User

pytestmark = pytest.mark.integration

SYS_DESCR = "1.3.6.1.2.1.1.1.0"
SYS_OBJECT_ID = "1.3.6.1.2.1.1.2.0"
SYS_UPTIME = "1.3.6.1.2.1.1.3.0"
SYS_CONTACT = "1.3.6.1.2.1.1.4.0"
SYS_NAME = "1.3.6.1.2.1.1.5.0"
SYS_LOCATION = "1.3.6.1.2.1.1.6.0"
SYSTEM = "1.3.6.1.2.1.1"
INTERFACES = "1.3.6.1.2.1.2"
IF_TABLE = "1.3.6.1.2.1.2.2"

_JOBS: dict[str, Any] = {
    "snmp.get": SnmpGetJob,
    "snmp.getnext": SnmpGetNextJob,
    "snmp.walk": SnmpWalkJob,
    "snmp.set": SnmpSetJob,
}


def v1(agent: Snmpd, community: str | None = None) -> dict[str, JsonValue]:
    return {"version": "1", "community": community or agent.community}


def v2c(agent: Snmpd, community: str | None = None) -> dict[str, JsonValue]:
    return {"version": "2c", "community": community or agent.community}


def v3(v3user: V3User, /, **override: str) -> dict[str, JsonValue]:
    auth: dict[str, JsonValue] = {
        "version": "3",
        "user": v3user.user,
        "security_level": v3user.security_level,
    }
    for name in ("auth_protocol", "auth_key", "priv_protocol", "priv_key"):
        value = getattr(v3user, name)
        if value is not None:
            auth[name] = value
    auth.update(override)
    return auth


Backend = Literal["pysnmp", "netsnmp"]
BACKENDS: tuple[Backend, ...] = ("pysnmp", "netsnmp")
#: The contract runs on the netsnmp backend twice: with its open sessions for plain v1/v2c GETs
#: (the default) and with every request through ezsnmp (`open_sessions=0`).
VARIANTS: tuple[tuple[Backend, int], ...] = (("pysnmp", 8), ("netsnmp", 8), ("netsnmp", 0))


@pytest.fixture(params=VARIANTS, ids=["pysnmp", "netsnmp", "netsnmp-ezsnmp-only"])
def variant(request: pytest.FixtureRequest) -> tuple[Backend, int]:
    chosen: tuple[Backend, int] = request.param
    return chosen


@pytest.fixture
def backend(variant: tuple[Backend, int]) -> Backend:
    return variant[0]


@pytest.fixture
async def driver(variant: tuple[Backend, int]) -> AsyncIterator[SnmpDriver]:
    backend, open_sessions = variant
    drv = SnmpDriver(
        SnmpOptions(timeout=1.0, retries=1, backend=backend, open_sessions=open_sessions)
    )
    assert (
        type(drv.backend).__name__
        == {"pysnmp": "PysnmpBackend", "netsnmp": "NetsnmpBackend"}[backend]
    )
    yield drv
    await drv.aclose()


async def run(
    driver: SnmpDriver,
    kind: str,
    params: dict[str, JsonValue],
    auth: dict[str, JsonValue],
    *,
    host: str = "127.0.0.1",
    port: int,
    timeout: float = 5.0,
    max_output_bytes: int = 4 * 1024 * 1024,
) -> Data:
    job = _JOBS[kind].model_validate(
        {
            "v": 1,
            "id": str(uuid.uuid4()),
            "kind": kind,
            "target": {"host": host, "port": port},
            "auth": auth,
            "params": params,
            "timeout": timeout,
        }
    )
    loop = asyncio.get_running_loop()
    ctx = JobContext(deadline=loop.time() + timeout, max_output_bytes=max_output_bytes)
    async with asyncio.timeout_at(ctx.deadline + 1.0):  # as the runner would, plus slack
        data: Data = await driver.run(job, job.auth, ctx)
    return data


def varbinds(data: Data) -> list[dict[str, Any]]:
    vbs = data["varbinds"]
    assert isinstance(vbs, list)
    return [vb for vb in vbs if isinstance(vb, dict)]


def by_oid(data: Data) -> dict[str, dict[str, Any]]:
    return {vb["oid"]: vb for vb in varbinds(data)}


def assert_no_secret(exc: JobError, *secrets: str | None) -> None:
    for secret in secrets:
        if secret:
            assert secret not in exc.message
            assert secret not in str(exc)


# --------------------------------------------------------------------------------------------
# Every version and security level


async def test_v1_get(driver: SnmpDriver, snmpd: Snmpd) -> None:
    data = await run(driver, "snmp.get", {"oids": [SYS_NAME]}, v1(snmpd), port=snmpd.port)
    assert varbinds(data) == [
        {
            "oid": SYS_NAME,
            "type": "OctetString",
            "value": snmpd.sys_name,
            "hex": snmpd.sys_name.encode().hex(),
        }
    ]


async def test_v2c_get(driver: SnmpDriver, snmpd: Snmpd) -> None:
    data = await run(driver, "snmp.get", {"oids": [SYS_NAME]}, v2c(snmpd), port=snmpd.port)
    assert by_oid(data)[SYS_NAME]["value"] == snmpd.sys_name


@pytest.mark.parametrize("label", list(V3_USERS))
async def test_v3_get_for_every_security_level_and_protocol(
    driver: SnmpDriver, snmpd: Snmpd, label: str
) -> None:
    auth = v3(snmpd.v3_users[label])
    data = await run(driver, "snmp.get", {"oids": [SYS_NAME, SYS_UPTIME]}, auth, port=snmpd.port)
    vbs = by_oid(data)
    assert vbs[SYS_NAME]["value"] == snmpd.sys_name
    assert vbs[SYS_UPTIME]["type"] == "TimeTicks"


@pytest.mark.parametrize("label", ["sha-aes", "sha256-aes192", "sha512-aes256", "md5-des"])
async def test_v3_walk_with_privacy(driver: SnmpDriver, snmpd: Snmpd, label: str) -> None:
    auth = v3(snmpd.v3_users[label])
    data = await run(driver, "snmp.walk", {"oids": [SYSTEM]}, auth, port=snmpd.port)
    assert SYS_NAME in by_oid(data)


async def test_many_security_levels_at_once_do_not_interfere(
    driver: SnmpDriver, snmpd: Snmpd
) -> None:
    auths = [v1(snmpd), v2c(snmpd), *(v3(u) for u in snmpd.v3_users.values())]
    results = await asyncio.gather(
        *(run(driver, "snmp.get", {"oids": [SYS_NAME]}, a, port=snmpd.port) for a in auths * 3)
    )
    assert all(by_oid(r)[SYS_NAME]["value"] == snmpd.sys_name for r in results)


# --------------------------------------------------------------------------------------------
# Rendering of real values


async def test_get_renders_every_smi_type_the_agent_serves(
    driver: SnmpDriver, snmpd: Snmpd
) -> None:
    oids = {
        "OctetString": SYS_DESCR,
        "ObjectIdentifier": SYS_OBJECT_ID,
        "TimeTicks": SYS_UPTIME,
        "Integer": "1.3.6.1.2.1.2.2.1.1.1",  # ifIndex.1
        "Gauge32": "1.3.6.1.2.1.2.2.1.5.1",  # ifSpeed.1
        "Counter32": "1.3.6.1.2.1.2.2.1.10.1",  # ifInOctets.1
        "Counter64": "1.3.6.1.2.1.31.1.1.1.6.1",  # ifHCInOctets.1
        "IpAddress": "1.3.6.1.2.1.4.20.1.1.127.0.0.1",  # ipAdEntAddr.127.0.0.1
        "Opaque": "1.3.6.1.4.1.2021.10.1.6.1",  # UCD laLoadFloat.1
        "noSuchObject": "1.3.6.1.2.1.1.99.0",
        "noSuchInstance": "1.3.6.1.2.1.1.5.1",
    }
    data = await run(driver, "snmp.get", {"oids": list(oids.values())}, v2c(snmpd), port=snmpd.port)
    vbs = varbinds(data)
    assert [vb["oid"] for vb in vbs] == list(oids.values())
    assert [vb["type"] for vb in vbs] == list(oids)
    got = by_oid(data)
    assert got[oids["ObjectIdentifier"]]["value"].startswith("1.3.6.1.4.1.")
    assert got[oids["IpAddress"]]["value"] == "127.0.0.1"
    assert isinstance(got[oids["Counter64"]]["value"], int)
    assert got[oids["Opaque"]]["value"] is None
    assert got[oids["Opaque"]]["hex"]
    assert got[oids["noSuchObject"]]["value"] is None
    assert "hex" not in got[oids["Counter32"]]


async def test_v1_get_of_a_missing_oid_is_no_such_name(driver: SnmpDriver, snmpd: Snmpd) -> None:
    with pytest.raises(SnmpError, match=r"noSuchName for varbind 2 \(1\.3\.6\.1\.2\.1\.1\.99\.0\)"):
        await run(
            driver,
            "snmp.get",
            {"oids": [SYS_NAME, "1.3.6.1.2.1.1.99.0"]},
            v1(snmpd),
            port=snmpd.port,
        )


async def test_get_of_more_oids_than_one_pdu_keeps_order(driver: SnmpDriver, snmpd: Snmpd) -> None:
    oids = [f"1.3.6.1.2.1.1.{n}.0" for n in range(1, 8)] * 30  # 210 OIDs: 4 PDUs
    data = await run(
        driver, "snmp.get", {"oids": list[JsonValue](oids)}, v2c(snmpd), port=snmpd.port
    )
    assert [vb["oid"] for vb in varbinds(data)] == oids


# --------------------------------------------------------------------------------------------
# GETNEXT and walks


@pytest.mark.parametrize("version", ["1", "2c", "3"])
async def test_getnext_returns_the_following_oids(
    driver: SnmpDriver, snmpd: Snmpd, version: str
) -> None:
    auth = {"1": v1(snmpd), "2c": v2c(snmpd), "3": v3(snmpd.v3_users["sha-aes"])}[version]
    data = await run(
        driver, "snmp.getnext", {"oids": [SYSTEM, "1.3.6.1.2.1.1.4.0"]}, auth, port=snmpd.port
    )
    assert [vb["oid"] for vb in varbinds(data)] == [SYS_DESCR, SYS_NAME]


async def test_walk_of_system_is_in_order_and_in_the_subtree(
    driver: SnmpDriver, snmpd: Snmpd
) -> None:
    data = await run(driver, "snmp.walk", {"oids": [SYSTEM]}, v2c(snmpd), port=snmpd.port)
    oids = [parse_oid(vb["oid"]) for vb in varbinds(data)]
    assert oids == sorted(oids)
    assert len(set(oids)) == len(oids)
    assert all(o[:7] == parse_oid(SYSTEM) for o in oids)
    assert {SYS_DESCR, SYS_NAME, SYS_UPTIME} <= set(by_oid(data))
    assert data["truncated"] is False


async def test_v1_getnext_walk_and_v2c_bulk_walk_agree(driver: SnmpDriver, snmpd: Snmpd) -> None:
    params: dict[str, JsonValue] = {"oids": [INTERFACES], "max_repetitions": 7}
    bulk = await run(driver, "snmp.walk", params, v2c(snmpd), port=snmpd.port)
    nxt = await run(driver, "snmp.walk", params, v1(snmpd), port=snmpd.port)
    bulk_oids = [vb["oid"] for vb in varbinds(bulk)]
    assert bulk_oids == [vb["oid"] for vb in varbinds(nxt) if vb["type"] != "Counter64"]
    assert any(vb["oid"].startswith(IF_TABLE + ".1.") for vb in varbinds(bulk))


async def test_walk_does_the_same_with_any_max_repetitions(
    driver: SnmpDriver, snmpd: Snmpd
) -> None:
    runs = [
        await run(
            driver,
            "snmp.walk",
            {"oids": [IF_TABLE], "max_repetitions": reps},
            v2c(snmpd),
            port=snmpd.port,
        )
        for reps in (1, 3, 25, 1000)
    ]
    oid_lists = [[vb["oid"] for vb in varbinds(r)] for r in runs]
    assert all(lst == oid_lists[0] for lst in oid_lists)


async def test_walk_of_several_roots_keeps_the_root_order(driver: SnmpDriver, snmpd: Snmpd) -> None:
    data = await run(
        driver, "snmp.walk", {"oids": [INTERFACES, SYSTEM]}, v2c(snmpd), port=snmpd.port
    )
    prefixes = ["if" if vb["oid"].startswith(INTERFACES + ".") else "sys" for vb in varbinds(data)]
    first_sys = prefixes.index("sys")
    assert set(prefixes[:first_sys]) == {"if"}
    assert set(prefixes[first_sys:]) == {"sys"}


async def test_walk_stops_at_max_varbinds_and_says_so(driver: SnmpDriver, snmpd: Snmpd) -> None:
    full = await run(driver, "snmp.walk", {"oids": [SYSTEM]}, v2c(snmpd), port=snmpd.port)
    n = len(varbinds(full))
    exact = await run(
        driver, "snmp.walk", {"oids": [SYSTEM], "max_varbinds": n}, v2c(snmpd), port=snmpd.port
    )
    assert len(varbinds(exact)) == n
    assert exact["truncated"] is False
    cut = await run(
        driver,
        "snmp.walk",
        {"oids": [SYSTEM, INTERFACES], "max_varbinds": 7, "max_repetitions": 5},
        v2c(snmpd),
        port=snmpd.port,
    )
    assert [vb["oid"] for vb in varbinds(cut)] == [vb["oid"] for vb in varbinds(full)][:7]
    assert cut["truncated"] is True


async def test_walk_of_an_empty_subtree_is_empty(driver: SnmpDriver, snmpd: Snmpd) -> None:
    for auth in (v1(snmpd), v2c(snmpd)):
        data = await run(driver, "snmp.walk", {"oids": ["1.3.6.1.2.1.1.99"]}, auth, port=snmpd.port)
        assert varbinds(data) == []


async def test_walk_past_the_end_of_the_mib_stops(driver: SnmpDriver, snmpd: Snmpd) -> None:
    for auth in (v1(snmpd), v2c(snmpd)):
        data = await run(driver, "snmp.walk", {"oids": ["1.3.6.1.9"]}, auth, port=snmpd.port)
        assert varbinds(data) == []


async def test_walk_over_the_output_cap_keeps_partial_data(
    driver: SnmpDriver, snmpd: Snmpd
) -> None:
    with pytest.raises(OutputTooLargeError) as info:
        await run(
            driver,
            "snmp.walk",
            {"oids": [SYSTEM]},
            v2c(snmpd),
            port=snmpd.port,
            max_output_bytes=1024,
        )
    assert info.value.data is not None
    partial = varbinds(info.value.data)
    assert partial
    assert partial[0]["oid"] == SYS_DESCR


# --------------------------------------------------------------------------------------------
# SET


async def test_v2c_set_then_get_reads_back(driver: SnmpDriver, snmpd: Snmpd) -> None:
    value = f"rack-{uuid.uuid4().hex[:8]}"
    params: dict[str, JsonValue] = {
        "varbinds": [{"oid": SYS_LOCATION, "type": "OctetString", "value": value}]
    }
    data = await run(driver, "snmp.set", params, v2c(snmpd, snmpd.write_community), port=snmpd.port)
    assert by_oid(data)[SYS_LOCATION]["value"] == value
    read = await run(driver, "snmp.get", {"oids": [SYS_LOCATION]}, v2c(snmpd), port=snmpd.port)
    assert by_oid(read)[SYS_LOCATION]["value"] == value


async def test_v3_set_of_two_varbinds_with_hex_then_get(driver: SnmpDriver, snmpd: Snmpd) -> None:
    contact = "noc@example.net"
    location = f"hall-{uuid.uuid4().hex[:6]}"
    params: dict[str, JsonValue] = {
        "varbinds": [
            {
                "oid": SYS_CONTACT,
                "type": "OctetString",
                "value": contact.encode().hex(),
                "hex": True,
            },
            {"oid": SYS_LOCATION, "type": "OctetString", "value": location},
        ]
    }
    auth = v3(snmpd.v3_users["rw"])
    data = await run(driver, "snmp.set", params, auth, port=snmpd.port)
    assert [vb["value"] for vb in varbinds(data)] == [contact, location]
    read = await run(
        driver, "snmp.get", {"oids": [SYS_CONTACT, SYS_LOCATION]}, auth, port=snmpd.port
    )
    assert [vb["value"] for vb in varbinds(read)] == [contact, location]


async def test_set_of_a_read_only_object_is_not_writable(driver: SnmpDriver, snmpd: Snmpd) -> None:
    params: dict[str, JsonValue] = {
        "varbinds": [{"oid": SYS_DESCR, "type": "OctetString", "value": "x"}]
    }
    with pytest.raises(SnmpError, match=r"notWritable for varbind 1 \(1\.3\.6\.1\.2\.1\.1\.1\.0\)"):
        await run(driver, "snmp.set", params, v2c(snmpd, snmpd.write_community), port=snmpd.port)


async def test_set_of_the_wrong_type_is_wrong_type(driver: SnmpDriver, snmpd: Snmpd) -> None:
    params: dict[str, JsonValue] = {
        "varbinds": [
            {"oid": SYS_LOCATION, "type": "OctetString", "value": "ok"},
            {"oid": SYS_CONTACT, "type": "Integer", "value": 5},
        ]
    }
    with pytest.raises(SnmpError, match="wrongType for varbind 2"):
        await run(driver, "snmp.set", params, v2c(snmpd, snmpd.write_community), port=snmpd.port)


async def test_set_with_the_read_only_community_is_refused(
    driver: SnmpDriver, snmpd: Snmpd
) -> None:
    params: dict[str, JsonValue] = {
        "varbinds": [{"oid": SYS_LOCATION, "type": "OctetString", "value": "x"}]
    }
    with pytest.raises(SnmpError, match=r"noAccess|notWritable|authorizationError"):
        await run(driver, "snmp.set", params, v2c(snmpd), port=snmpd.port)


# --------------------------------------------------------------------------------------------
# Failures: timeout, unreachable and auth kept apart


#: What a `device_timeout` says silence may also be (agents drop what they cannot authenticate).
WRONG_COMMUNITY_HINT = "a wrong community looks the same as a dead device"
WRONG_V3_HINT = "wrong SNMPv3 credentials can look the same as a dead device"


@pytest.mark.parametrize("kind", ["snmp.get", "snmp.walk"])
@pytest.mark.parametrize("version", [v1, v2c])
async def test_wrong_community_is_a_device_timeout_that_says_so(
    driver: SnmpDriver,
    snmpd: Snmpd,
    kind: str,
    version: Callable[[Snmpd, str], dict[str, JsonValue]],
) -> None:
    start = time.monotonic()
    with pytest.raises(DeviceTimeoutError) as info:
        await run(
            driver,
            kind,
            {"oids": [SYS_NAME if kind == "snmp.get" else SYSTEM]},
            version(snmpd, "not-the-community"),
            port=snmpd.port,
            timeout=1.0,
        )
    assert time.monotonic() - start <= 1.2
    assert info.value.message.startswith(f"no SNMP response from 127.0.0.1:{snmpd.port}")
    assert WRONG_COMMUNITY_HINT in info.value.message
    assert_no_secret(info.value, "not-the-community", snmpd.community)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A bound UDP port on 127.0.0.1 that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["snmp.get", "snmp.walk"])
@pytest.mark.parametrize("deadline", [0.5, 1.5])
async def test_a_silent_agent_is_a_device_timeout_within_the_deadline(
    driver: SnmpDriver, silent_port: int, kind: str, deadline: float
) -> None:
    start = time.monotonic()
    with pytest.raises(DeviceTimeoutError):
        await run(
            driver,
            kind,
            {"oids": [SYS_NAME]},
            {"version": "2c", "community": "public"},
            port=silent_port,
            timeout=deadline,
        )
    assert time.monotonic() - start <= deadline * 1.2


async def test_a_silent_v3_agent_is_a_device_timeout(
    driver: SnmpDriver, snmpd: Snmpd, silent_port: int
) -> None:
    start = time.monotonic()
    with pytest.raises(DeviceTimeoutError):
        await run(
            driver,
            "snmp.get",
            {"oids": [SYS_NAME]},
            v3(snmpd.v3_users["sha-aes"]),
            port=silent_port,
            timeout=1.0,
        )
    assert time.monotonic() - start <= 1.2


async def test_wrong_v3_auth_key_is_auth_failed(driver: SnmpDriver, snmpd: Snmpd) -> None:
    user = snmpd.v3_users["sha-aes"]
    with pytest.raises(DeviceAuthError, match="wrong SNMPv3 auth key") as info:
        await run(
            driver,
            "snmp.get",
            {"oids": [SYS_NAME]},
            v3(user, auth_key="wrong-auth-key"),
            port=snmpd.port,
        )
    assert info.value.code == "auth_failed"
    assert_no_secret(info.value, "wrong-auth-key", user.priv_key)


async def test_wrong_v3_auth_protocol_is_auth_failed(driver: SnmpDriver, snmpd: Snmpd) -> None:
    with pytest.raises(DeviceAuthError, match="wrong SNMPv3 auth key"):
        await run(
            driver,
            "snmp.get",
            {"oids": [SYS_NAME]},
            v3(snmpd.v3_users["sha256"], auth_protocol="SHA512"),
            port=snmpd.port,
        )


async def test_unknown_v3_user_is_auth_failed(driver: SnmpDriver, snmpd: Snmpd) -> None:
    with pytest.raises(DeviceAuthError, match="does not know this SNMPv3 user"):
        await run(
            driver,
            "snmp.get",
            {"oids": [SYS_NAME]},
            v3(snmpd.v3_users["sha-aes"], user="no-such-user"),
            port=snmpd.port,
        )


async def test_a_security_level_the_user_lacks_is_auth_failed(
    driver: SnmpDriver, snmpd: Snmpd
) -> None:
    # md5user has no privacy key on the agent: an authPriv request is refused with a report.
    auth = v3(snmpd.v3_users["md5"], security_level="authPriv", priv_protocol="AES")
    auth["priv_key"] = "some-priv-key"
    with pytest.raises(DeviceAuthError, match="usmStatsUnsupportedSecLevels"):
        await run(driver, "snmp.get", {"oids": [SYS_NAME]}, auth, port=snmpd.port)


async def test_wrong_v3_priv_key_is_a_device_timeout(driver: SnmpDriver, snmpd: Snmpd) -> None:
    """Net-SNMP cannot parse what a wrong priv key encrypts and drops it without a report.

    So a wrong priv key looks exactly like silence (documented in docs/drivers/snmp.md).
    """
    user = snmpd.v3_users["sha-aes"]
    with pytest.raises(DeviceTimeoutError) as info:
        await run(
            driver,
            "snmp.get",
            {"oids": [SYS_NAME]},
            v3(user, priv_key="wrong-priv-key"),
            port=snmpd.port,
            timeout=1.0,
        )
    assert WRONG_V3_HINT in info.value.message
    assert_no_secret(info.value, "wrong-priv-key", user.auth_key)


async def test_right_key_works_again_after_a_wrong_one(driver: SnmpDriver, snmpd: Snmpd) -> None:
    user = snmpd.v3_users["sha-des"]
    ok = await run(driver, "snmp.get", {"oids": [SYS_NAME]}, v3(user), port=snmpd.port)
    assert by_oid(ok)[SYS_NAME]["value"] == snmpd.sys_name
    with pytest.raises(DeviceAuthError):
        await run(
            driver, "snmp.get", {"oids": [SYS_NAME]}, v3(user, auth_key="xxxxxxxx"), port=snmpd.port
        )
    again = await run(driver, "snmp.get", {"oids": [SYS_NAME]}, v3(user), port=snmpd.port)
    assert by_oid(again)[SYS_NAME]["value"] == snmpd.sys_name


async def test_one_user_name_with_two_keys_at_once_gets_both_answers_right(
    driver: SnmpDriver, snmpd: Snmpd
) -> None:
    user = snmpd.v3_users["sha-aes"]
    good = v3(user)
    bad = v3(user, auth_key="another-key-1")
    params: dict[str, JsonValue] = {"oids": [SYS_NAME]}
    results = await asyncio.gather(
        *(run(driver, "snmp.walk", {"oids": [SYSTEM]}, good, port=snmpd.port) for _ in range(3)),
        *(run(driver, "snmp.get", params, bad, port=snmpd.port) for _ in range(3)),
        *(run(driver, "snmp.get", params, good, port=snmpd.port) for _ in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(r, dict) for r in results[:3])
    assert all(isinstance(r, DeviceAuthError) for r in results[3:6])
    assert all(isinstance(r, dict) for r in results[6:])


async def test_an_unknown_host_name_is_device_unreachable(
    driver: SnmpDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_such_name(*_args: object, **_kwargs: object) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # No DNS query leaves the machine: the loop's resolver says the name does not exist.
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_such_name)
    with pytest.raises(DeviceUnreachableError, match="cannot resolve host name"):
        await run(
            driver,
            "snmp.get",
            {"oids": [SYS_NAME]},
            {"version": "2c", "community": "public"},
            host="no-such-device.example",
            port=161,
        )


async def test_host_names_are_resolved(driver: SnmpDriver, snmpd: Snmpd) -> None:
    data = await run(
        driver, "snmp.get", {"oids": [SYS_NAME]}, v2c(snmpd), host="localhost", port=snmpd.port
    )
    assert by_oid(data)[SYS_NAME]["value"] == snmpd.sys_name


# --------------------------------------------------------------------------------------------
# Both backends side by side, their documented differences, and Net-SNMP under concurrency

#: Values that do not change while the agent runs (no counters, no uptime, nothing set above).
STABLE = [
    SYS_DESCR,
    SYS_OBJECT_ID,
    SYS_NAME,
    "1.3.6.1.2.1.1.7.0",  # sysServices
    "1.3.6.1.2.1.1.9.1.2.1",  # sysORID.1
    "1.3.6.1.2.1.1.9.1.3.1",  # sysORDescr.1
    "1.3.6.1.2.1.2.2.1.1.1",  # ifIndex.1
    "1.3.6.1.2.1.2.2.1.2.1",  # ifDescr.1
    "1.3.6.1.2.1.2.2.1.5.1",  # ifSpeed.1
    "1.3.6.1.2.1.2.2.1.6.1",  # ifPhysAddress.1 (empty on lo)
    "1.3.6.1.2.1.4.20.1.1.127.0.0.1",  # ipAdEntAddr
    "1.3.6.1.2.1.1.99.0",  # noSuchObject
    "1.3.6.1.2.1.1.5.1",  # noSuchInstance
]


@pytest.fixture
async def both() -> AsyncIterator[dict[Backend, SnmpDriver]]:
    drivers: dict[Backend, SnmpDriver] = {
        name: SnmpDriver(SnmpOptions(timeout=1.0, retries=1, backend=name))
        for name in ("pysnmp", "netsnmp")
    }
    yield drivers
    for drv in drivers.values():
        await drv.aclose()


async def test_both_backends_render_the_same_varbinds_byte_for_byte(
    both: dict[Backend, SnmpDriver], snmpd: Snmpd
) -> None:
    auths = [v1(snmpd), v2c(snmpd), v3(snmpd.v3_users["sha256-aes192"])]
    for auth in auths:
        oids = STABLE if auth["version"] != "1" else STABLE[:-2]  # v1: noSuchName, tested above
        params: dict[str, JsonValue] = {"oids": list[JsonValue](oids)}
        got = {
            name: await run(drv, "snmp.get", params, auth, port=snmpd.port)
            for name, drv in both.items()
        }
        assert got["netsnmp"] == got["pysnmp"]
        walks = {
            name: await run(drv, "snmp.walk", {"oids": [IF_TABLE + ".1.2"]}, auth, port=snmpd.port)
            for name, drv in both.items()
        }
        assert walks["netsnmp"] == walks["pysnmp"]
    empty = by_oid(got["netsnmp"])["1.3.6.1.2.1.2.2.1.6.1"]
    assert empty == {"oid": "1.3.6.1.2.1.2.2.1.6.1", "type": "OctetString", "value": "", "hex": ""}


async def test_opaque_floats_agree_to_the_printed_precision_on_both_backends(
    both: dict[Backend, SnmpDriver], snmpd: Snmpd
) -> None:
    """Documented difference: Net-SNMP decodes an Opaque float and prints it with 6 decimals.

    The netsnmp backend re-encodes that text as the same BER (tag 9f78, 4 bytes), so its float is
    exactly the agent's float printed with `%f` (correctly rounded, ties to even: 0.3828125 prints
    as 0.382812) and packed again as a 32-bit float; pysnmp passes the agent's bytes through.
    """

    def printed(value: float) -> float:
        return float(struct.unpack(">f", struct.pack(">f", float(f"{value:.6f}")))[0])

    oids: list[JsonValue] = [f"1.3.6.1.4.1.2021.10.1.6.{n}" for n in (1, 2, 3)]  # laLoadFloat
    for _attempt in range(5):  # the load average may change between the two requests
        got = {
            name: varbinds(await run(drv, "snmp.get", {"oids": oids}, v2c(snmpd), port=snmpd.port))
            for name, drv in both.items()
        }
        floats = {
            name: [struct.unpack(">f", bytes.fromhex(vb["hex"])[3:])[0] for vb in vbs]
            for name, vbs in got.items()
        }
        if floats["netsnmp"] == [printed(value) for value in floats["pysnmp"]]:
            break
    for name in BACKENDS:
        assert all(vb["type"] == "Opaque" and vb["value"] is None for vb in got[name])
        assert all(vb["hex"].startswith("9f7804") and len(vb["hex"]) == 14 for vb in got[name])
    assert floats["netsnmp"] == [printed(value) for value in floats["pysnmp"]]


@pytest.mark.parametrize("smi", ["Counter32", "Counter64", "Opaque"])
async def test_set_of_a_type_snmpset_cannot_send_differs_by_backend(
    driver: SnmpDriver, backend: Backend, snmpd: Snmpd, smi: str
) -> None:
    """Documented difference: Net-SNMP's snmpset has no Counter32, Counter64 or Opaque type.

    The netsnmp backend refuses before sending anything; pysnmp sends it and the agent refuses.
    """
    value: JsonValue = "00" if smi == "Opaque" else 5
    params: dict[str, JsonValue] = {
        "varbinds": [{"oid": SYS_LOCATION, "type": smi, "value": value, "hex": smi == "Opaque"}]
    }
    auth = v2c(snmpd, snmpd.write_community)
    if backend == "netsnmp":
        with pytest.raises(SnmpError, match=f"netsnmp backend cannot send {smi}.*pysnmp"):
            await run(driver, "snmp.set", params, auth, port=snmpd.port)
    else:
        with pytest.raises(SnmpError, match=r"agent answered (wrongType|notWritable)"):
            await run(driver, "snmp.set", params, auth, port=snmpd.port)


async def test_netsnmp_200_gets_at_concurrency_32_across_identities_are_all_right(
    snmpd: Snmpd,
) -> None:
    """No cross-talk between threads, v2c and v3 identities (and no crash of the process)."""
    pysnmp = SnmpDriver(SnmpOptions(timeout=1.0, retries=1, backend="pysnmp"))
    params: dict[str, JsonValue] = {"oids": list[JsonValue](STABLE)}
    expected = by_oid(await run(pysnmp, "snmp.get", params, v2c(snmpd), port=snmpd.port))
    await pysnmp.aclose()

    netsnmp = SnmpDriver(SnmpOptions(timeout=2.0, retries=1, backend="netsnmp", threads=32))
    users = [
        "noauth",
        "md5",
        "sha",
        "sha256",
        "sha-des",
        "sha-aes",
        "sha256-aes192",
        "sha512-aes256",
    ]
    identities = [
        v2c(snmpd),
        v2c(snmpd, snmpd.write_community),  # read-write, limited to the system group
        *(v3(snmpd.v3_users[label]) for label in users),
    ]
    limit = asyncio.Semaphore(32)

    async def one(n: int) -> tuple[list[str], Data]:
        auth = identities[n % len(identities)]
        pool = STABLE[:6] if auth.get("community") == snmpd.write_community else STABLE
        start = n % len(pool)
        oids = (pool[start:] + pool[:start])[: 1 + n % len(pool)]
        async with limit:
            data = await run(
                netsnmp, "snmp.get", {"oids": list[JsonValue](oids)}, auth, port=snmpd.port
            )
        return oids, data

    try:
        results = await asyncio.gather(*(one(n) for n in range(200)))
    finally:
        await netsnmp.aclose()
    for oids, data in results:
        assert varbinds(data) == [expected[oid] for oid in oids]
