"""The Net-SNMP backend's local parts: reading what Net-SNMP prints, building its arguments,
its default community, and its private directory."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import threading
import time
from pathlib import Path

import pytest

from poller.drivers.snmp_base import render_varbind
from poller.drivers.snmp_netsnmp import (
    _c_string,
    _Call,
    _decode,
    _DefaultCommunity,
    _Identity,
    _identity,
    _master_key,
    _numeric_oid,
    _opaque_bytes,
    _packet_answer,
    _private_directory,
    _remove_private,
    _set_argument,
)
from poller.errors import DeviceTimeoutError, SnmpError
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


# --------------------------------------------------------------------------------------------
# The argument vector and Net-SNMP's default community (the leak of `-c`)


def _get(auth: SnmpAuth) -> _Call:
    return _Call(
        kind="get",
        device=("127.0.0.1", 161),
        peer="udp:127.0.0.1:161",
        ident=_identity(auth),
        user=auth.user or "",
        names=[".1.3.6.1.2.1.1.5.0"],
        timeout=2.0,
        retries=1,
        deadline=time.monotonic() + 10,
    )


def test_a_community_goes_on_the_command_line_unless_it_is_the_default() -> None:
    call = _get(SnmpAuth(version="2c", community="c0mm"))
    assert call.argv(2.0, 1) == [
        *("-On", "-Ox", "-t", "2", "-r", "1", "-v", "2c", "-c", "c0mm"),
        *("udp:127.0.0.1:161", ".1.3.6.1.2.1.1.5.0"),
    ]
    assert call.argv(2.0, 1, community=False) == [
        *("-On", "-Ox", "-t", "2", "-r", "1", "-v", "2c"),
        *("udp:127.0.0.1:161", ".1.3.6.1.2.1.1.5.0"),
    ]
    v3 = _get(SnmpAuth(version="3", user="u"))
    assert "-c" not in v3.argv(2.0, 1)
    assert v3.argv(2.0, 1) == v3.argv(2.0, 1, community=False)


def test_a_community_is_compared_as_the_c_string_net_snmp_gets() -> None:
    assert _c_string("public") == b"public"
    assert _c_string("pub\0lic") == b"pub"
    assert _c_string("\0x") == b""
    assert _c_string("caf\u00e9") == "caf\u00e9".encode()
    assert _c_string("\ud800") is None


class _Setting:
    """Stands in for libnetsnmp's `netsnmp_ds_set_string`: records what it was set to."""

    def __init__(self) -> None:
        self.values: list[bytes | None] = []

    def __call__(self, value: bytes | None) -> None:
        self.values.append(value)


def _ident(community: str | None) -> _Identity:
    if community is None:
        return _identity(SnmpAuth(version="3", user="u"))
    return _identity(SnmpAuth(version="2c", community=community))


def test_the_default_community_follows_the_requests_while_none_holds_it() -> None:
    setting = _Setting()
    slot = _DefaultCommunity(setting)
    later = time.monotonic() + 10
    first = slot.enter(_ident("public"), later)
    assert (first.hold, first.omit) == (True, True)
    second = slot.enter(_ident("public"), later)
    assert second.omit
    assert setting.values == [b"public"]  # set once, shared
    other = slot.enter(_ident("private"), later)
    assert (other.hold, other.omit) == (False, False)  # held: `-c private` as before
    slot.leave(other)
    slot.leave(first)
    slot.leave(second)
    taken = slot.enter(_ident("private"), later)
    assert taken.omit
    assert setting.values == [b"public", b"private"]
    slot.leave(taken)


def test_snmpv3_requests_hold_the_default_community_without_using_it() -> None:
    setting = _Setting()
    slot = _DefaultCommunity(setting)
    later = time.monotonic() + 10
    v3 = slot.enter(_ident(None), later)
    assert (v3.hold, v3.omit) == (True, False)
    assert not slot.enter(_ident("public"), later).omit  # cannot change under an SNMPv3 session
    assert setting.values == []
    slot.leave(v3)
    assert slot.enter(_ident("public"), later).omit


def test_an_empty_community_unsets_the_default_first_and_waits_for_its_holders() -> None:
    setting = _Setting()
    slot = _DefaultCommunity(setting)
    later = time.monotonic() + 10
    public = slot.enter(_ident("public"), later)
    with pytest.raises(DeviceTimeoutError, match="another community"):
        slot.enter(_ident(""), time.monotonic() + 0.05)
    assert slot.unsetting == 0
    threading.Timer(0.1, slot.leave, (public,)).start()
    empty = slot.enter(_ident(""), later)
    assert (empty.hold, empty.omit) == (True, False)  # `-c ""`, and no default to take
    assert setting.values == [b"public", None]
    slot.leave(empty)


def test_without_libnetsnmp_every_request_passes_its_community() -> None:
    slot = _DefaultCommunity(None)
    for community in ("public", "", None):
        held = slot.enter(_ident(community), time.monotonic() + 10)
        assert (held.hold, held.omit) == (False, False)
        slot.leave(held)


# --------------------------------------------------------------------------------------------
# The private directory


def _parent(base: Path) -> Path:
    return base / f"usm-netsnmp.{os.getuid()}"


def test_the_private_directory_is_per_process_0700_and_locked(tmp_path: Path) -> None:
    path, lock = _private_directory(str(tmp_path))
    try:
        assert lock is not None
        private = Path(path)
        assert private.parent == _parent(tmp_path)
        assert private.name.startswith(f"{os.getpid()}-")
        for directory in (private, private.parent):
            assert stat.S_IMODE(directory.lstat().st_mode) == 0o700
        probe = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        _remove_private(path, lock)
    assert not Path(path).exists()
    assert list(_parent(tmp_path).iterdir()) == []


def test_directories_nobody_holds_are_removed_and_held_ones_kept(tmp_path: Path) -> None:
    held_path, held_lock = _private_directory(str(tmp_path))
    abandoned = _parent(tmp_path) / "4242-abandoned"
    (abandoned / "cert_indexes").mkdir(parents=True, mode=0o700)
    stray = _parent(tmp_path) / "not-a-directory"
    stray.write_text("")
    path, lock = _private_directory(str(tmp_path))
    try:
        assert not abandoned.exists()
        assert Path(held_path).is_dir()  # another live holder
        assert stray.exists()  # only directories are ours to remove
    finally:
        _remove_private(path, lock)
        _remove_private(held_path, held_lock)


def test_a_parent_with_loose_permissions_of_ours_is_made_0700(tmp_path: Path) -> None:
    _parent(tmp_path).mkdir(mode=0o755)
    _parent(tmp_path).chmod(0o755)
    path, lock = _private_directory(str(tmp_path))
    try:
        assert lock is not None
        assert stat.S_IMODE(_parent(tmp_path).stat().st_mode) == 0o700
    finally:
        _remove_private(path, lock)


def test_a_symbolic_link_in_place_of_the_parent_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "4242-victim").mkdir()
    _parent(tmp_path).symlink_to(elsewhere)
    path, lock = _private_directory(str(tmp_path))
    try:
        assert lock is None  # a one-off directory, as before
        assert Path(path).parent == tmp_path
        assert Path(path).name.startswith("usm-netsnmp-")
        assert (elsewhere / "4242-victim").is_dir()  # nothing swept through the link
        assert list(elsewhere.iterdir()) == [elsewhere / "4242-victim"]
    finally:
        _remove_private(path, lock)
    assert not Path(path).exists()


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory another user owns needs root")
def test_a_parent_that_another_user_made_is_not_used(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    _parent(tmp_path).mkdir(mode=0o777)
    os.chown(_parent(tmp_path), 65534, 65534)  # nobody
    path, lock = _private_directory(str(tmp_path))
    try:
        assert lock is None
        assert Path(path).parent == tmp_path
        assert list(_parent(tmp_path).iterdir()) == []
    finally:
        _remove_private(path, lock)
