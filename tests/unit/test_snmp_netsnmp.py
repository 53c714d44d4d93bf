"""The Net-SNMP backend's pure parts: reading what Net-SNMP prints, and building `snmpset` args."""

from __future__ import annotations

import struct

import pytest

from poller.drivers.snmp import render_varbind
from poller.drivers.snmp_netsnmp import (
    _decode,
    _identity,
    _master_key,
    _numeric_oid,
    _opaque_bytes,
    _packet_answer,
    _set_argument,
)
from poller.errors import SnmpError
from poller.wire import SnmpAuth


@pytest.mark.parametrize(
    "printed",
    [".1.3.6.1.2.1.1.5.0", "1.3.6.1.2.1.1.5.0", "iso.3.6.1.2.1.1.5.0", ".iso.3.6.1.2.1.1.5.0"],
)
def test_oids_are_numeric_whatever_output_option_was_in_force(printed: str) -> None:
    assert _numeric_oid(printed) == "1.3.6.1.2.1.1.5.0"


def test_a_symbolic_oid_is_an_snmp_error() -> None:
    with pytest.raises(SnmpError, match="not numeric"):
        _numeric_oid("SNMPv2-MIB::sysName.0")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            ("iso.3.6.1.2.1.1.5.0", "Hex-STRING", "74 65 \n73 74"),
            render_varbind("1.3.6.1.2.1.1.5.0", "OctetString", b"test"),
        ),
        (
            (".1.3.6.1.2.1.2.2.1.6.1", '""', ""),
            render_varbind("1.3.6.1.2.1.2.2.1.6.1", "OctetString", b""),
        ),
        (
            (".1.3.6.1.2.1.1.3.0", "Timeticks", "(429) 0:00:04.29"),
            render_varbind("1.3.6.1.2.1.1.3.0", "TimeTicks", 429),
        ),
        (
            (".1.3.6.1.2.1.2.2.1.8.1", "INTEGER", "up(1)"),
            render_varbind("1.3.6.1.2.1.2.2.1.8.1", "Integer", 1),
        ),
        (
            (".1.3.6.1.2.1.2.2.1.1.1", "INTEGER", "-7"),
            render_varbind("1.3.6.1.2.1.2.2.1.1.1", "Integer", -7),
        ),
        (
            (".1.3.6.1.2.1.1.2.0", "OID", "iso.3.6.1.4.1.8072.3.2.10"),
            render_varbind("1.3.6.1.2.1.1.2.0", "ObjectIdentifier", "1.3.6.1.4.1.8072.3.2.10"),
        ),
        (
            (".1.3.6.1.2.1.4.20.1.1.127.0.0.1", "IpAddress", "127.0.0.1"),
            render_varbind("1.3.6.1.2.1.4.20.1.1.127.0.0.1", "IpAddress", "127.0.0.1"),
        ),
        (
            (".1.3.6.1.2.1.31.1.1.1.6.1", "Counter64", "18446744073709551615"),
            render_varbind("1.3.6.1.2.1.31.1.1.1.6.1", "Counter64", 2**64 - 1),
        ),
        (
            (".1.3.6.1.2.1.1.99.0", "NOSUCHOBJECT", "No Such Object available"),
            render_varbind("1.3.6.1.2.1.1.99.0", "noSuchObject", None),
        ),
        (
            (".1.3.6.1.2.1.1.5.1", "NOSUCHINSTANCE", "No Such Instance"),
            render_varbind("1.3.6.1.2.1.1.5.1", "noSuchInstance", None),
        ),
    ],
)
def test_printed_varbinds_render_as_pysnmp_renders_them(
    row: tuple[str, str, str], expected: dict[str, object]
) -> None:
    assert _decode(row) == (expected, False)


def test_end_of_mib_view_is_recognised() -> None:
    text = "No more variables left in this MIB View (It is past the end of the MIB tree)"
    assert _decode((".1.3.6.1.9", text, text)) == (
        render_varbind("1.3.6.1.9", "endOfMibView", None),
        True,
    )


def test_an_unknown_printed_type_is_an_snmp_error() -> None:
    with pytest.raises(SnmpError, match="unsupported SMI type"):
        _decode((".1.3.6.1", "Wrong Type (should be INTEGER)", "x"))


def test_opaque_special_types_are_re_encoded_as_ber() -> None:
    assert _opaque_bytes("Float: 0.500000") == b"\x9f\x78\x04" + struct.pack(">f", 0.5)
    assert _opaque_bytes("Double: 0.250000") == b"\x9f\x79\x08" + struct.pack(">d", 0.25)
    assert _opaque_bytes("UInt64: 255") == b"\x9f\x7b\x02\x00\xff"
    assert _opaque_bytes("I64: -1") == b"\x9f\x7a\x01\xff"
    assert _opaque_bytes("01 02 0A") == b"\x01\x02\x0a"


def test_error_status_and_failed_object_are_read_from_the_message() -> None:
    answer = _packet_answer(
        "Error in packet.\nReason: notWritable (That object does not support modification)\n"
        "Failed object: iso.3.6.1.2.1.1.1.0\n"
    )
    assert (answer.status, answer.failed_oid) == (17, "1.3.6.1.2.1.1.1.0")
    answer = _packet_answer("Error in packet.\nReason: (genError) A general failure occured\n")
    assert (answer.status, answer.failed_oid) == (5, None)


def test_set_arguments_use_snmpset_letters_and_exact_bytes() -> None:
    assert _set_argument(0, "1.3", "OctetString", b"\x00hi") == ("x", "006869")
    assert _set_argument(0, "1.3", "OctetString", b"") == ("s", "")
    assert _set_argument(0, "1.3", "Unsigned32", 5) == ("u", "5")
    assert _set_argument(0, "1.3", "ObjectIdentifier", "1.3.6.1") == ("o", ".1.3.6.1")
    with pytest.raises(
        SnmpError, match=r"varbinds\[2\] \(1\.3\): the netsnmp backend cannot send Counter64"
    ):
        _set_argument(2, "1.3", "Counter64", 5)


def test_master_keys_follow_rfc_3414_a_3() -> None:
    assert _master_key("md5", "maplesyrup") == "9faf3283884e92834ebc9847d8edd963"
    assert _master_key("sha1", "maplesyrup") == "9fb5cc0381497b3793528939ff788d5d79145211"


def test_v3_identities_carry_master_keys_not_pass_phrases_and_differ_by_key() -> None:
    auth = SnmpAuth(
        version="3", user="u", auth_protocol="SHA", auth_key="maplesyrup", priv_key="privpass-4567"
    )
    ident = _identity(auth)
    assert "maplesyrup" not in ident.args
    assert ident.args[ident.args.index("-3m") + 1] == _master_key("sha1", "maplesyrup")
    assert ident.args[ident.args.index("-3M") + 1] == _master_key("sha1", "privpass-4567")
    other = _identity(auth.model_copy(update={"auth_key": auth.priv_key}))
    assert other.fingerprint != ident.fingerprint
    assert _identity(SnmpAuth(version="2c", community="c0mm")).fingerprint == ""
