"""Pure SNMP helpers: varbind rendering, set values, walk steps, timeouts, output cap."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poller.drivers.base import JobContext
from poller.drivers.snmp import SnmpDriver, SnmpOptions
from poller.drivers.snmp_base import (
    OutputBudget,
    SetValue,
    SnmpTarget,
    Varbind,
    WalkResult,
    error_status_name,
    format_oid,
    is_printable_text,
    oid_in_subtree,
    parse_oid,
    plan_timeout,
    render_varbind,
    set_value,
    snmp_status_error,
    varbind_json_size,
    walk_step,
)
from poller.errors import ConfigError, OutputTooLargeError, SnmpError
from poller.wire import SetVarbind, SnmpAuth, SnmpGetJob, SnmpSetJob, SnmpWalkJob

PRINTABLE = ["L", "M", "N", "P", "S", "Z", "Cf"]
oid_parts = st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=2, max_size=20)


# --------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize(
    ("smi", "value", "expected"),
    [
        ("Integer", -5, -5),
        ("Counter32", 4_294_967_295, 4_294_967_295),
        ("Gauge32", 10_000_000, 10_000_000),
        ("TimeTicks", 12345, 12345),
        ("Counter64", 2**64 - 1, 2**64 - 1),
    ],
)
def test_numeric_types_render_as_json_numbers(smi: str, value: int, expected: int) -> None:
    vb = render_varbind("1.3.6.1.2.1.1.3.0", smi, value)  # type: ignore[arg-type]
    assert vb == {"oid": "1.3.6.1.2.1.1.3.0", "type": smi, "value": expected}
    assert json.loads(json.dumps(vb))["value"] == expected


def test_printable_octet_string_renders_text_and_hex() -> None:
    vb = render_varbind("1.3.6.1.2.1.1.5.0", "OctetString", b"sw-12")
    assert vb == {
        "oid": "1.3.6.1.2.1.1.5.0",
        "type": "OctetString",
        "value": "sw-12",
        "hex": "73772d3132",
    }


def test_binary_octet_string_renders_null_value_and_hex() -> None:
    vb = render_varbind("1.3.6.1.2.1.2.2.1.6.2", "OctetString", b"\x00\x1a\x2b\xff\xfe\x01")
    assert vb["value"] is None
    assert vb["hex"] == "001a2bfffe01"


def test_utf8_octet_string_is_text() -> None:
    vb = render_varbind("1.3.6.1.2.1.1.6.0", "OctetString", "Zürich, Gebäude 3 / 東京".encode())
    assert vb["value"] == "Zürich, Gebäude 3 / 東京"


def test_empty_octet_string_is_empty_text() -> None:
    assert render_varbind("1.3", "OctetString", b"") == {
        "oid": "1.3",
        "type": "OctetString",
        "value": "",
        "hex": "",
    }


@pytest.mark.parametrize(
    "raw",
    [b"abc\x00", b"\x1b[0m", b"\xc3\x28", b"line\x7f"],
)
def test_control_characters_and_invalid_utf8_are_not_text(raw: bytes) -> None:
    assert is_printable_text(raw) is None


def test_whitespace_keeps_text_printable() -> None:
    assert is_printable_text(b"a\tb\r\nc") == "a\tb\r\nc"


def test_opaque_always_has_hex_and_no_text() -> None:
    vb = render_varbind("1.3.6.1.4.1.2021.10.1.6.1", "Opaque", b"\x9f\x78\x04\x3e\x26\x80\x00")
    assert vb == {
        "oid": "1.3.6.1.4.1.2021.10.1.6.1",
        "type": "Opaque",
        "value": None,
        "hex": "9f78043e268000",
    }


def test_ip_address_renders_dotted_from_bytes_or_text() -> None:
    assert render_varbind("1.3", "IpAddress", b"\x0a\x14\x00\x0f")["value"] == "10.20.0.15"
    assert render_varbind("1.3", "IpAddress", "192.0.2.1")["value"] == "192.0.2.1"
    assert "hex" not in render_varbind("1.3", "IpAddress", b"\x7f\x00\x00\x01")


def test_object_identifier_renders_dotted_without_leading_dot() -> None:
    vb = render_varbind("1.3.6.1.2.1.1.2.0", "ObjectIdentifier", ".1.3.6.1.4.1.8072.3.2.10")
    assert vb["value"] == "1.3.6.1.4.1.8072.3.2.10"


@pytest.mark.parametrize("smi", ["Null", "noSuchObject", "noSuchInstance", "endOfMibView"])
def test_null_and_exception_values_render_null(smi: str) -> None:
    assert render_varbind("1.3.6.1.2.1.99.0", smi, None) == {  # type: ignore[arg-type]
        "oid": "1.3.6.1.2.1.99.0",
        "type": smi,
        "value": None,
    }


@pytest.mark.parametrize(
    ("smi", "value"),
    [("Integer", "5"), ("Counter64", True), ("OctetString", "text"), ("ObjectIdentifier", 5)],
)
def test_wrong_python_type_for_an_smi_type_is_a_bug(smi: str, value: object) -> None:
    with pytest.raises(TypeError):
        render_varbind("1.3", smi, value)  # type: ignore[arg-type]


def test_unknown_smi_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown SMI type"):
        render_varbind("1.3", "Bits", b"")  # type: ignore[arg-type]


@given(st.binary(max_size=300))
def test_octet_string_hex_round_trips_and_text_matches_bytes(raw: bytes) -> None:
    vb = render_varbind("1.3.6.1", "OctetString", raw)
    assert isinstance(vb["hex"], str)
    assert bytes.fromhex(vb["hex"]) == raw
    assert vb["hex"] == vb["hex"].lower()
    if vb["value"] is not None:
        assert isinstance(vb["value"], str)
        assert vb["value"].encode() == raw
    json.dumps(vb)  # always JSON-serialisable


@given(
    st.text(alphabet=st.characters(categories=["L", "M", "N", "P", "S", "Z", "Cf"]), max_size=100)
)
def test_printable_unicode_text_is_kept(text: str) -> None:
    assert render_varbind("1.3", "OctetString", text.encode())["value"] == text


@given(oid_parts)
def test_oid_format_and_parse_round_trip(parts: list[int]) -> None:
    assert parse_oid(format_oid(parts)) == tuple(parts)
    assert parse_oid("." + format_oid(parts)) == tuple(parts)


def test_varbind_json_size_matches_the_encoded_body() -> None:
    vbs = [render_varbind("1.3.6.1.2.1.1.6.0", "OctetString", "Zürich".encode())] * 3
    body = json.dumps({"varbinds": vbs}, ensure_ascii=False).encode()
    estimate = len('{"varbinds":[]}') + sum(varbind_json_size(vb) for vb in vbs)
    assert abs(estimate - len(body)) <= 16


@given(
    st.dictionaries(
        st.sampled_from(["oid", "type", "value", "hex"]),
        st.none() | st.booleans() | st.integers() | st.text() | st.sampled_from(['a"b', "a\\b"]),
    )
)
def test_varbind_json_size_is_its_json_with_a_comma(varbind: dict[str, Any]) -> None:
    """The size is that of `json.dumps` (default separators, UTF-8) plus one comma."""
    text = json.dumps(varbind, ensure_ascii=False)
    assert varbind_json_size(cast("Varbind", varbind)) == len(text.encode()) + 1


# --------------------------------------------------------------------------------------------
# Set values


def _sv(type_: str, value: int | str, *, hex_: bool = False) -> SetValue:
    vb = SetVarbind.model_validate(
        {"oid": "1.3.6.1.2.1.1.4.0", "type": type_, "value": value, "hex": hex_}
    )
    return set_value(0, vb)


def test_set_octet_string_text_is_utf8() -> None:
    assert _sv("OctetString", "noc@example") == ("1.3.6.1.2.1.1.4.0", "OctetString", b"noc@example")


def test_set_octet_string_hex_is_decoded() -> None:
    assert _sv("OctetString", "001AFF", hex_=True)[2] == b"\x00\x1a\xff"


def test_set_invalid_hex_is_an_snmp_error() -> None:
    with pytest.raises(SnmpError, match=r"varbinds\[0\].*hex"):
        _sv("OctetString", "zz", hex_=True)


def test_set_integer_accepts_decimal_text() -> None:
    assert _sv("Integer", "-7")[2] == -7


@pytest.mark.parametrize(
    ("type_", "value"),
    [
        ("Integer", 2**31),
        ("Counter32", -1),
        ("Gauge32", 2**32),
        ("Unsigned32", 2**32),
        ("TimeTicks", -5),
        ("Counter64", 2**64),
        ("Integer", "abc"),
        ("IpAddress", "300.1.1.1"),
        ("IpAddress", "10.0.0"),
        ("ObjectIdentifier", "not.an.oid"),
    ],
)
def test_set_values_out_of_range_or_malformed_are_rejected(type_: str, value: int | str) -> None:
    with pytest.raises(SnmpError, match=r"varbinds\[0\]"):
        _sv(type_, value)


def test_set_ip_address_and_oid_stay_text() -> None:
    assert _sv("IpAddress", "10.0.0.1")[2] == "10.0.0.1"
    assert _sv("ObjectIdentifier", ".1.3.6.1.4.1")[2] == "1.3.6.1.4.1"


# --------------------------------------------------------------------------------------------
# Error statuses


def test_error_status_names_follow_rfc_3416() -> None:
    assert error_status_name(1) == "tooBig"
    assert error_status_name(2) == "noSuchName"
    assert error_status_name(5) == "genErr"
    assert error_status_name(17) == "notWritable"
    assert error_status_name(99) == "errorStatus(99)"


def test_status_error_names_the_failing_varbind_across_pdus() -> None:
    oids = [f"1.3.6.1.2.1.1.{i}.0" for i in range(1, 9)]
    gathered: list[Varbind] = [render_varbind(oids[0], "Integer", 1)]
    err = snmp_status_error(17, 2, oids, gathered, offset=4)
    assert err.code == "snmp_error"
    assert err.message == "agent answered notWritable for varbind 6 (1.3.6.1.2.1.1.6.0)"
    assert err.data == {"varbinds": gathered}


def test_status_error_without_index_has_no_oid() -> None:
    assert snmp_status_error(5, 0, ["1.3"], []).message == "agent answered genErr"


# --------------------------------------------------------------------------------------------
# Walk steps


def _ret(*oids: str, end: int | None = None) -> list[tuple[tuple[int, ...], bool]]:
    return [(parse_oid(o), i == end) for i, o in enumerate(oids)]


ROOT = parse_oid("1.3.6.1.2.1.1")


def test_walk_step_accepts_the_subtree_and_continues_from_the_last_oid() -> None:
    step = walk_step(ROOT, ROOT, _ret("1.3.6.1.2.1.1.1.0", "1.3.6.1.2.1.1.2.0"))
    assert [o for o, _ in step.accepted] == [
        parse_oid("1.3.6.1.2.1.1.1.0"),
        (1, 3, 6, 1, 2, 1, 1, 2, 0),
    ]
    assert step.next_oid == parse_oid("1.3.6.1.2.1.1.2.0")
    assert not step.non_increasing


def test_walk_step_stops_at_the_end_of_the_subtree() -> None:
    step = walk_step(ROOT, ROOT, _ret("1.3.6.1.2.1.1.9.1.4.10", "1.3.6.1.2.1.2.1.0"))
    assert len(step.accepted) == 1
    assert step.next_oid is None


def test_walk_step_stops_at_end_of_mib_view() -> None:
    step = walk_step(ROOT, ROOT, _ret("1.3.6.1.2.1.1.1.0", "1.3.6.1.2.1.1.1.0", end=1))
    assert len(step.accepted) == 1
    assert step.next_oid is None
    assert not step.non_increasing


def test_walk_step_reports_a_non_increasing_oid() -> None:
    last = parse_oid("1.3.6.1.2.1.1.5.0")
    step = walk_step(ROOT, last, _ret("1.3.6.1.2.1.1.6.0", "1.3.6.1.2.1.1.6.0"))
    assert len(step.accepted) == 1
    assert step.non_increasing
    assert step.next_oid is None


def test_walk_step_does_not_return_the_root_itself() -> None:
    step = walk_step(ROOT, parse_oid("1.3.6.1.2.1"), _ret("1.3.6.1.2.1.1"))
    assert step.accepted == []
    assert step.next_oid is None


def test_walk_step_on_an_empty_answer_stops() -> None:
    assert walk_step(ROOT, ROOT, []) == walk_step(ROOT, ROOT, [])
    assert walk_step(ROOT, ROOT, []).next_oid is None


@given(oid_parts, oid_parts)
def test_oid_in_subtree_means_prefix_and_longer(oid: list[int], root: list[int]) -> None:
    inside = oid_in_subtree(oid, root)
    assert inside == (len(oid) > len(root) and oid[: len(root)] == root)
    assert oid_in_subtree([*root, 1], root)
    assert not oid_in_subtree(root, root)


# --------------------------------------------------------------------------------------------
# Timeouts and output cap


def test_plan_timeout_keeps_the_configured_timeout_when_there_is_time() -> None:
    assert plan_timeout(30.0, 2.0, 2) == (2.0, 2)


def test_plan_timeout_shrinks_near_the_deadline() -> None:
    assert plan_timeout(1.0, 2.0, 2) == (0.3, 2)
    assert plan_timeout(0.25, 2.0, 2) == (0.1, 1)
    assert plan_timeout(0.05, 2.0, 2) == (0.1, 0)
    assert plan_timeout(-1.0, 2.0, 2) == (0.1, 0)


@given(
    st.floats(min_value=0.0, max_value=3600.0),
    st.floats(min_value=0.1, max_value=60.0),
    st.integers(min_value=0, max_value=10),
)
def test_plan_timeout_fits_all_tries_in_the_remaining_time(
    remaining: float, timeout: float, retries: int
) -> None:
    per_try, tries = plan_timeout(remaining, timeout, retries)
    assert 0 <= tries <= retries
    assert per_try >= 0.1
    assert per_try <= max(timeout, 0.1) + 1e-9
    if remaining >= 0.1:
        assert per_try * (tries + 1) <= remaining + 1e-9
    assert round(per_try * 10, 6).is_integer()


def test_output_budget_raises_with_partial_data() -> None:
    budget = OutputBudget(200)
    vb = render_varbind("1.3.6.1.2.1.1.5.0", "OctetString", b"x" * 20)
    budget.add(vb)
    with pytest.raises(OutputTooLargeError) as info:
        budget.extend([vb] * 10)
    assert info.value.data == {"varbinds": budget.varbinds}
    assert 1 <= len(budget.varbinds) < 10
    assert len(json.dumps({"varbinds": budget.varbinds})) <= 200


# --------------------------------------------------------------------------------------------
# The driver over a fake backend (our own seam)


class FakeBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[str, SnmpTarget, object]] = []
        self.closed = False

    async def get(self, target: SnmpTarget, oids: Sequence[str]) -> list[Varbind]:
        self.calls.append(("get", target, list(oids)))
        return [render_varbind(oid, "Integer", 1) for oid in oids]

    async def getnext(self, target: SnmpTarget, oids: Sequence[str]) -> list[Varbind]:
        self.calls.append(("getnext", target, list(oids)))
        return []

    async def walk(
        self, target: SnmpTarget, roots: Sequence[str], *, max_repetitions: int, max_varbinds: int
    ) -> WalkResult:
        self.calls.append(("walk", target, (list(roots), max_repetitions, max_varbinds)))
        return WalkResult([render_varbind("1.3.6.1.2.1.1.1.0", "OctetString", b"x")], True)

    async def set(self, target: SnmpTarget, varbinds: Sequence[SetValue]) -> list[Varbind]:
        self.calls.append(("set", target, list(varbinds)))
        return []

    async def aclose(self) -> None:
        self.closed = True


def _job(kind: str, params: dict[str, object], port: int | None = None) -> dict[str, object]:
    return {
        "v": 1,
        "id": "j1",
        "kind": kind,
        "target": {"host": "192.0.2.7", "port": port},
        "auth": {"version": "2c", "community": "public"},
        "params": params,
    }


async def test_driver_passes_target_limits_and_options_to_the_backend() -> None:
    backend = FakeBackend()
    driver = SnmpDriver(SnmpOptions(timeout=1.5, retries=4), backend=backend)
    job = SnmpGetJob.model_validate(_job("snmp.get", {"oids": ["1.3.6.1.2.1.1.5.0"]}))
    ctx = JobContext(deadline=123.0, max_output_bytes=5000)
    data = await driver.run(job, job.auth, ctx)
    assert data == {"varbinds": [render_varbind("1.3.6.1.2.1.1.5.0", "Integer", 1)]}
    _, target, _ = backend.calls[0]
    assert (target.host, target.port, target.deadline, target.max_output_bytes) == (
        "192.0.2.7",
        161,
        123.0,
        5000,
    )
    assert (target.timeout, target.retries) == (1.5, 4)
    await driver.aclose()
    assert backend.closed


async def test_driver_walk_reports_truncation() -> None:
    backend = FakeBackend()
    driver = SnmpDriver(backend=backend)
    job = SnmpWalkJob.model_validate(
        _job("snmp.walk", {"oids": ["1.3.6.1.2.1.1"], "max_varbinds": 1}, port=1161)
    )
    data = await driver.run(job, job.auth, JobContext(deadline=1.0, max_output_bytes=10_000))
    assert data["truncated"] is True
    assert backend.calls[0][2] == (["1.3.6.1.2.1.1"], 25, 1)


async def test_driver_checks_set_values_before_sending() -> None:
    backend = FakeBackend()
    driver = SnmpDriver(backend=backend)
    job = SnmpSetJob.model_validate(
        _job(
            "snmp.set", {"varbinds": [{"oid": "1.3.6.1.2.1.1.4.0", "type": "Gauge32", "value": -1}]}
        )
    )
    with pytest.raises(SnmpError):
        await driver.run(job, job.auth, JobContext(deadline=1.0, max_output_bytes=10_000))
    assert backend.calls == []


async def test_driver_refuses_non_snmp_credentials() -> None:
    driver = SnmpDriver(backend=FakeBackend())
    job = SnmpGetJob.model_validate(_job("snmp.get", {"oids": ["1.3.6.1"]}))
    with pytest.raises(SnmpError, match="SNMP credentials"):
        await driver.run(job, None, JobContext(deadline=1.0, max_output_bytes=10_000))


@pytest.mark.parametrize(
    ("choice", "chosen"),
    [("auto", "NetsnmpBackend"), ("netsnmp", "NetsnmpBackend"), ("pysnmp", "PysnmpBackend")],
)
def test_backend_choice_prefers_netsnmp_when_ezsnmp_imports(choice: str, chosen: str) -> None:
    driver = SnmpDriver(SnmpOptions(backend=choice))  # type: ignore[arg-type]
    assert type(driver.backend).__name__ == chosen


def test_without_ezsnmp_auto_falls_back_to_pysnmp_and_netsnmp_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "poller.drivers.snmp_netsnmp", None)  # import → ImportError
    assert type(SnmpDriver(SnmpOptions(backend="auto")).backend).__name__ == "PysnmpBackend"
    with pytest.raises(ConfigError, match="USM_POLLER_SNMP_BACKEND=netsnmp needs the ezsnmp"):
        SnmpDriver(SnmpOptions(backend="netsnmp"))


def test_secrets_stay_out_of_the_target_repr() -> None:
    auth = SnmpAuth(version="2c", community="s3cret-community")
    target = SnmpTarget("h", 161, auth, 1.0, 1.0, 1, 1000)
    assert "s3cret" not in repr(target)
