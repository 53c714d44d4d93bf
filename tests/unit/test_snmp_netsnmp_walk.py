"""The walk-program parts of the Net-SNMP backend that need no agent: reading what
`snmpbulkwalk` prints, its command line and `snmp.conf`, what its exit means, and `SubtreeWalk`.
"""

from __future__ import annotations

import pytest

from poller.drivers.snmp_base import OutputBudget, SubtreeWalk, Varbind, WalkPage, render_varbind
from poller.drivers.snmp_netsnmp import (
    _decode,
    _master_key,
    _program_outcome,
    _walk_conf,
)
from poller.drivers.snmp_netsnmp_walk import PrintedVarbinds, Row, walk_argv
from poller.errors import DeviceAuthError, DeviceTimeoutError, OutputTooLargeError, SnmpError
from poller.wire import SnmpAuth

#: What `snmpbulkwalk -On -Ox -Oe` printed for a Net-SNMP agent and a test agent (5.9.3).
PRINTED = (
    b".1.3.6.1.2.1.1.1.0 = Hex-STRING: 4C 69 6E 75 78 20 76 6D 20 36 2E 31 38 2E 34 34 \n"
    b"2D 66 63 2D 76 37 38 32 20 23 31 20 53 4D 50 20 \n"
    b"50 52 45 45 4D 50 54 5F 44 59 4E 41 4D 49 43 20 \n"
    b"40 30 20 78 38 36 5F 36 34 \n"
    b".1.3.6.1.2.1.1.2.0 = OID: .1.3.6.1.4.1.8072.3.2.10\n"
    b".1.3.6.1.2.1.1.3.0 = Timeticks: (467) 0:00:04.67\n"
    b".1.3.6.1.2.1.1.7.0 = INTEGER: 72\n"
    b'.1.3.6.1.2.1.2.2.1.6.1 = ""\n'
    b".1.3.6.1.2.1.2.2.1.6.2 = Hex-STRING: E6 80 BD BA B0 D2 \n"
    b".1.3.6.1.2.1.4.20.1.1.127.0.0.1 = IpAddress: 127.0.0.1\n"
    b".1.3.6.1.2.1.31.1.1.1.6.1 = Counter64: 18446744073709551615\n"
    b".1.3.6.1.4.1.2021.10.1.6.1 = Opaque: Float: 0.500000\n"
    b".1.3.6.1.4.1.99999.1.10 = OPAQUE: 01 02 \n"
    b".1.3.6.1.4.1.99999.1.11 = NULL\n"
    b".1.3.6.1.4.1.99999.1.12 = No Such Object available on this agent at this OID\n"
    b".1.3.6.1.4.1.99999.1.13 = No Such Instance currently exists at this OID\n"
    b".1.3.6.1.4.1.99999.1.13 = No more variables left in this MIB View "
    b"(It is past the end of the MIB tree)\n"
)
SYS_DESCR = b"Linux vm 6.18.44-fc-v782 #1 SMP PREEMPT_DYNAMIC @0 x86_64"

EXPECTED: list[tuple[Varbind, bool]] = [
    (render_varbind("1.3.6.1.2.1.1.1.0", "OctetString", SYS_DESCR), False),
    (render_varbind("1.3.6.1.2.1.1.2.0", "ObjectIdentifier", "1.3.6.1.4.1.8072.3.2.10"), False),
    (render_varbind("1.3.6.1.2.1.1.3.0", "TimeTicks", 467), False),
    (render_varbind("1.3.6.1.2.1.1.7.0", "Integer", 72), False),
    (render_varbind("1.3.6.1.2.1.2.2.1.6.1", "OctetString", b""), False),
    (render_varbind("1.3.6.1.2.1.2.2.1.6.2", "OctetString", bytes.fromhex("e680bdbab0d2")), False),
    (render_varbind("1.3.6.1.2.1.4.20.1.1.127.0.0.1", "IpAddress", "127.0.0.1"), False),
    (render_varbind("1.3.6.1.2.1.31.1.1.1.6.1", "Counter64", 2**64 - 1), False),
    (render_varbind("1.3.6.1.4.1.2021.10.1.6.1", "Opaque", bytes.fromhex("9f78043f000000")), False),
    (render_varbind("1.3.6.1.4.1.99999.1.10", "Opaque", b"\x01\x02"), False),
    (render_varbind("1.3.6.1.4.1.99999.1.11", "Null", None), False),
    (render_varbind("1.3.6.1.4.1.99999.1.12", "noSuchObject", None), False),
    (render_varbind("1.3.6.1.4.1.99999.1.13", "noSuchInstance", None), False),
    (render_varbind("1.3.6.1.4.1.99999.1.13", "endOfMibView", None), True),
]


def _read(chunks: list[bytes]) -> list[Row]:
    printed = PrintedVarbinds()
    rows: list[Row] = []
    for chunk in chunks:
        rows += printed.feed(chunk)
    return rows + printed.close()


def test_printed_varbinds_decode_as_the_page_walk_decodes_them() -> None:
    assert [_decode(row) for row in _read([PRINTED])] == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 61, 1000])
def test_chunk_boundaries_anywhere_give_the_same_rows(size: int) -> None:
    chunks = [PRINTED[i : i + size] for i in range(0, len(PRINTED), size)]
    assert _read(chunks) == _read([PRINTED])


def test_a_varbind_is_held_back_until_the_next_line_shows_it_is_complete() -> None:
    printed = PrintedVarbinds()
    assert printed.feed(b".1.3.6.1.2.1.1.5.0 = Hex-STRING: 74 65 \n") == []
    assert printed.feed(b"73 74 \n") == []
    assert printed.feed(b".1.3.6.1.2.1.1.6.0 = INTEGER: 1\n") == [
        (".1.3.6.1.2.1.1.5.0", "Hex-STRING", "74 65 \n73 74 ")
    ]
    assert printed.close() == [(".1.3.6.1.2.1.1.6.0", "INTEGER", "1")]
    assert printed.close() == []


def test_snmpwalk_end_of_mib_line_is_not_part_of_a_value() -> None:
    rows = _read([b".1.3.6.1.2.1.1.5.0 = Hex-STRING: 74 65 \nEnd of MIB\n"])
    assert rows == [(".1.3.6.1.2.1.1.5.0", "Hex-STRING", "74 65 ")]
    assert _decode(rows[0])[0]["hex"] == "7465"


def test_the_command_line_holds_no_credential() -> None:
    bulk = walk_argv(
        "/usr/bin/snmpbulkwalk",
        bulk=True,
        peer="udp6:[::1]:1161",
        root="1.3.6.1.2.1",
        timeout=0.7,
        retries=1,
        max_repetitions=25,
    )
    assert bulk == [
        "/usr/bin/snmpbulkwalk",
        "-On",
        "-Ox",
        "-Oe",
        "-t",
        "0.7",
        "-r",
        "1",
        "-Cr25",
        "udp6:[::1]:1161",
        ".1.3.6.1.2.1",
    ]
    nxt = walk_argv(
        "snmpwalk",
        bulk=False,
        peer="udp:1.2.3.4:161",
        root="1.3",
        timeout=2,
        retries=0,
        max_repetitions=25,
    )
    assert "-CI" in nxt
    assert not any(arg.startswith("-Cr") for arg in nxt)
    assert not {"-c", "-u", "-a", "-A", "-x", "-X", "-3m", "-3M", "-3k", "-3K"} & set(bulk + nxt)


def test_v2c_conf_quotes_the_community() -> None:
    conf = _walk_conf(SnmpAuth(version="2c", community='pub "lic" \\ #x'))
    assert conf is not None
    assert 'defCommunity "pub \\"lic\\" \\\\ #x"\n' in conf
    assert "defVersion 2c\n" in conf
    assert _walk_conf(SnmpAuth(version="1", community="public")) == (
        'dontLoadHostConfig true\ndefVersion 1\ndefCommunity "public"\n'
    )


@pytest.mark.parametrize("community", ["two\nlines", "nul\0", "cr\r"])
def test_a_community_a_conf_line_cannot_hold_stays_in_process(community: str) -> None:
    assert _walk_conf(SnmpAuth(version="2c", community=community)) is None


def test_v3_conf_carries_master_keys_not_pass_phrases() -> None:
    auth = SnmpAuth(
        version="3",
        user="aes256user",
        auth_protocol="SHA512",
        auth_key="authpass-0123",
        priv_protocol="AES256",
        priv_key="privpass-4567",
        context="ctx 1",
    )
    conf = _walk_conf(auth)
    assert conf is not None
    assert "authpass-0123" not in conf
    assert "privpass-4567" not in conf
    assert conf.splitlines() == [
        "dontLoadHostConfig true",
        "defVersion 3",
        'defSecurityName "aes256user"',
        "defSecurityLevel authPriv",
        "defAuthType SHA-512",
        f"defAuthMasterKey 0x{_master_key('sha512', 'authpass-0123')}",
        "defPrivType AES-256",
        f"defPrivMasterKey 0x{_master_key('sha512', 'privpass-4567')}",
        'defContext "ctx 1"',
    ]
    plain = _walk_conf(SnmpAuth(version="3", user="noauthuser"))
    assert plain is not None
    assert plain.splitlines()[-1] == "defSecurityLevel noAuthNoPriv"


# --------------------------------------------------------------------------------------------
# What the program's exit means


def _walk(budget: OutputBudget | None = None) -> SubtreeWalk:
    async def never(_last: tuple[int, ...], _reps: int, _bulk: bool) -> WalkPage:
        raise AssertionError("no page is fetched here")

    return SubtreeWalk(
        never,
        "1.3.6.1",
        budget or OutputBudget(10_000),
        bulk=True,
        max_repetitions=25,
        max_varbinds=100,
    )


@pytest.mark.parametrize(
    "said",
    [
        "Timeout: No Response from udp:127.0.0.1:1161\n",
        "Created directory: /tmp/usm-walk-x/cert_indexes\nsnmpbulkwalk: Timeout\n",
    ],
)
def test_a_timeout_is_a_device_timeout(said: str) -> None:
    with pytest.raises(
        DeviceTimeoutError, match=r"^no SNMP response from 10\.0\.0\.1:161 \("
    ) as v2:
        _program_outcome(1, said, _walk(), "10.0.0.1:161", None)
    assert "a wrong community looks the same as a dead device" in v2.value.message
    with pytest.raises(DeviceTimeoutError) as v3:
        _program_outcome(1, said, _walk(), "10.0.0.1:161", "opsuser")
    assert "wrong SNMPv3 credentials can look the same as a dead device" in v3.value.message


@pytest.mark.parametrize(
    ("said", "message"),
    [
        (
            "snmpbulkwalk: Authentication failure (incorrect password, community or key)\n",
            r"wrong SNMPv3 auth key or auth protocol \(usmStatsWrongDigests\) for user 'u1'",
        ),
        ("snmpbulkwalk: Unknown user name\n", "does not know this SNMPv3 user"),
        ("snmpbulkwalk: Unsupported security level\n", "usmStatsUnsupportedSecLevels"),
    ],
)
def test_snmpv3_failures_are_auth_failed(said: str, message: str) -> None:
    with pytest.raises(DeviceAuthError, match=message):
        _program_outcome(1, said, _walk(), "10.0.0.1:161", "u1")


def test_an_error_status_or_another_failure_hands_the_walk_back() -> None:
    said = "Error in packet.\nReason: (genError) A general failure occured\n"
    assert _program_outcome(2, said, _walk(), "h:1", None) is None
    assert _program_outcome(1, "snmpbulkwalk: Unknown host (x)\n", _walk(), "h:1", None) is None
    assert _program_outcome(-9, "", _walk(), "h:1", None) is None


def test_a_clean_exit_ends_the_subtree() -> None:
    said = "Created directory: /tmp/usm-walk-timeout/cert_indexes\n"
    assert _program_outcome(0, said, _walk(), "h:1", None) is False


def test_the_program_s_own_non_increasing_check_is_an_snmp_error() -> None:
    said = "Error: OID not increasing: .1.3.6.1.5\n >= .1.3.6.1.4\n"
    with pytest.raises(SnmpError, match=r"non-increasing OID after 1\.3\.6\.1 while walking"):
        _program_outcome(1, said, _walk(), "h:1", None)


# --------------------------------------------------------------------------------------------
# SubtreeWalk: rows from anywhere, in walk order


def _row(oid: str, value: int = 1) -> tuple[tuple[int, ...], bool, Varbind]:
    return tuple(int(p) for p in oid.split(".")), False, render_varbind(oid, "Integer", value)


def test_apply_goes_on_from_the_last_row_and_stops_outside_the_subtree() -> None:
    walk = _walk()
    assert walk.apply([_row("1.3.6.1.1"), _row("1.3.6.1.2")]) is None
    assert walk.last == (1, 3, 6, 1, 2)
    assert walk.apply([_row("1.3.6.1.3"), _row("1.3.6.2")]) is False
    assert [vb["oid"] for vb in walk.budget.varbinds] == ["1.3.6.1.1", "1.3.6.1.2", "1.3.6.1.3"]


def test_apply_reports_a_non_increasing_oid_with_what_came_before() -> None:
    walk = _walk()
    walk.apply([_row("1.3.6.1.5")])
    with pytest.raises(SnmpError, match=r"non-increasing OID after 1\.3\.6\.1\.5") as info:
        walk.apply([_row("1.3.6.1.6"), _row("1.3.6.1.6")])
    assert info.value.data == {"varbinds": walk.budget.varbinds}
    assert len(walk.budget.varbinds) == 2


def test_apply_says_truncated_only_when_one_more_row_exists() -> None:
    walk = SubtreeWalk(
        _walk().fetch, "1.3.6.1", OutputBudget(10_000), bulk=True, max_repetitions=5, max_varbinds=2
    )
    assert walk.apply([_row("1.3.6.1.1"), _row("1.3.6.1.2")]) is None
    assert walk.left == 0
    assert walk.apply([_row("1.3.6.1.3")]) is True
    assert len(walk.budget.varbinds) == 2


def test_apply_keeps_the_output_cap() -> None:
    walk = _walk(OutputBudget(80))
    with pytest.raises(OutputTooLargeError) as info:
        walk.apply([_row(f"1.3.6.1.{n}") for n in range(1, 10)])
    assert info.value.data == {"varbinds": walk.budget.varbinds}


async def test_page_halves_max_repetitions_on_too_big_and_resumes_from_last() -> None:
    asked: list[tuple[tuple[int, ...], int]] = []

    async def fetch(last: tuple[int, ...], reps: int, _bulk: bool) -> WalkPage:
        asked.append((last, reps))
        if reps > 4:
            return WalkPage(1, 0, [])
        return WalkPage(0, 0, [_row("1.3.6.1.9"), _row("1.3.7")])

    walk = SubtreeWalk(
        fetch, "1.3.6.1", OutputBudget(10_000), bulk=True, max_repetitions=10, max_varbinds=100
    )
    walk.apply([_row("1.3.6.1.2")])
    assert await walk.page() is None  # tooBig at 10
    assert await walk.page() is None  # tooBig at 5
    assert await walk.page() is False  # 2 rows: one in the subtree, then the end
    assert asked == [((1, 3, 6, 1, 2), 10), ((1, 3, 6, 1, 2), 5), ((1, 3, 6, 1, 2), 2)]
    assert [vb["oid"] for vb in walk.budget.varbinds] == ["1.3.6.1.2", "1.3.6.1.9"]
