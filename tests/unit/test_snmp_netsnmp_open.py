"""The open sessions' OID check: what Net-SNMP might parse otherwise goes through ezsnmp."""

from __future__ import annotations

import pytest

pytest.importorskip("netsnmpy")

from poller.drivers import snmp_netsnmp_open


@pytest.fixture(scope="module")
def lib() -> snmp_netsnmp_open._Lib:
    from netsnmpy import _netsnmp  # noqa: PLC0415 - the module under test loads it lazily

    return snmp_netsnmp_open._Lib(_netsnmp)


@pytest.mark.parametrize(
    ("name", "arcs"),
    [
        (".1.3.6.1.2.1.1.5.0", (1, 3, 6, 1, 2, 1, 1, 5, 0)),
        (".0.0", (0, 0)),
        (".1.3.4294967295", (1, 3, 4294967295)),
        ("." + ".".join(["1"] * 128), (1,) * 128),
    ],
)
def test_plain_numeric_oids_are_sent_as_they_are(
    lib: snmp_netsnmp_open._Lib, name: str, arcs: tuple[int, ...]
) -> None:
    got = snmp_netsnmp_open._oid(lib, name)
    assert got is not None
    array, length = got
    assert length == len(arcs)
    assert tuple(lib.ffi.unpack(array, length)) == arcs


@pytest.mark.parametrize(
    "name",
    [
        ".1",
        ".1.3.4294967296",
        "." + ".".join(["1"] * 129),
        ".1.3.x",
        ".1.3.-1",
        ".1.3.+1",
        ".1..3",
        ".1.3.\u0661",  # an Arabic-Indic digit one: a digit to str.isdigit, not to Net-SNMP
    ],
)
def test_anything_else_goes_through_ezsnmp(lib: snmp_netsnmp_open._Lib, name: str) -> None:
    assert snmp_netsnmp_open._oid(lib, name) is None


@pytest.mark.parametrize(
    ("soft", "threads", "expected"),
    [(1_048_576, 64, 8), (1024, 64, 2), (1024, 256, 1), (4096, 32, 8), (2048, 64, 4)],
)
def test_open_sessions_hold_at_most_a_quarter_of_the_descriptors(
    monkeypatch: pytest.MonkeyPatch, soft: int, threads: int, expected: int
) -> None:
    import resource  # noqa: PLC0415 - patched for this test only

    from poller.drivers import snmp_netsnmp  # noqa: PLC0415

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, soft))
    backend = snmp_netsnmp.NetsnmpBackend(threads=threads, open_sessions=8)
    assert snmp_netsnmp._sessions_per_thread(backend) == expected
