"""Wire protocol v1: models, round trips, and decode errors that never leak or crash."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum, StrEnum
from types import FrameType
from typing import Any, cast

import pydantic_core
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from poller import wire
from poller.errors import WireError
from tests import strategies

GOOD: dict[str, Any] = {
    "v": 1,
    "id": "5e0b2c1e",
    "kind": "snmp.get",
    "target": {"host": "10.20.0.15", "port": 161},
    "auth": {"version": "2c", "community": "public"},
    "params": {"oids": ["1.3.6.1.2.1.1.5.0", "1.3.6.1.2.1.1.3.0"]},
    "timeout": 10.0,
    "not_after": "2026-11-23T10:00:00Z",
    "idempotent": True,
    "meta": {"device_id": 1532},
}


def body(**changes: Any) -> bytes:
    return json.dumps(GOOD | changes).encode()


def test_design_example_decodes() -> None:
    job = wire.decode_job(body())
    assert isinstance(job, wire.SnmpGetJob)
    assert job.params.oids == ["1.3.6.1.2.1.1.5.0", "1.3.6.1.2.1.1.3.0"]
    assert job.meta == {"device_id": 1532}


@given(strategies.jobs)
@settings(max_examples=300)
def test_every_job_round_trips(job: wire.JobRequest) -> None:
    assert wire.decode_job(wire.encode(job)) == job


@given(strategies.results())
@settings(max_examples=200)
def test_every_result_round_trips(result: wire.JobResult) -> None:
    assert wire.decode_result(wire.encode(result)) == result


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_arbitrary_bytes_only_raise_wire_error(raw: bytes) -> None:
    with contextlib.suppress(WireError):
        wire.decode_job(raw)


@given(
    st.recursive(
        strategies.json_leaf,
        lambda s: st.dictionaries(st.text(max_size=8), s) | st.lists(s),
        max_leaves=30,
    )
)
@settings(max_examples=300)
def test_arbitrary_json_only_raises_wire_error(value: object) -> None:
    with pytest.raises(WireError):
        wire.decode_job(json.dumps(value).encode())


@given(strategies.job_dicts(), st.sampled_from(["v", "id", "kind", "target", "params"]))
def test_mangled_jobs_raise_wire_error(job: dict[str, Any], field: str) -> None:
    job[field] = {"nested": [1, 2, None]}
    with pytest.raises(WireError):
        wire.decode_job(json.dumps(job).encode())


def _outcome(decode: Any) -> tuple[str, ...]:
    try:
        return ("ok", wire.encode(decode()).decode())
    except WireError as exc:
        return ("error", exc.error_code, exc.message, str(exc.job_id))


@given(
    strategies.job_dicts(),
    st.sampled_from(["v", "id", "kind", "target", "params", "auth", "timeout", "meta", "x"]),
    strategies.json_values,
    st.booleans(),
)
@settings(max_examples=100)
def test_validate_job_of_parsed_json_says_what_decode_job_says(
    job: dict[str, Any], field: str, value: object, mangle: bool
) -> None:
    # The core service parses a body once and validates the objects (`validate_job`): it must
    # accept, refuse and word its refusals exactly as a poller decoding the bytes would.
    if mangle:
        job[field] = value
    body = json.dumps(job).encode()
    assert _outcome(lambda: wire.validate_job(json.loads(body))) == _outcome(
        lambda: wire.decode_job(body)
    )


def test_other_version_is_unsupported_version_with_id() -> None:
    with pytest.raises(WireError) as info:
        wire.decode_job(body(v=2))
    assert info.value.error_code == "unsupported_version"
    assert info.value.job_id == "5e0b2c1e"


def test_boolean_version_is_not_version_one() -> None:
    with pytest.raises(WireError) as info:
        wire.decode_job(body(v=True))
    assert info.value.error_code == "unsupported_version"


def test_unknown_kind_suggests_the_nearest() -> None:
    with pytest.raises(WireError) as info:
        wire.decode_job(body(kind="snmp.gett"))
    assert info.value.error_code == "unknown_kind"
    assert "snmp.get" in info.value.message


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(WireError) as info:
        wire.decode_job(body(colour="blue"))
    assert info.value.error_code == "invalid_job"
    assert "colour" in info.value.message


def test_oversize_body_is_rejected_unparsed() -> None:
    with pytest.raises(WireError, match="exceeds the limit"):
        wire.decode_job(b"{" + b" " * 2000 + b"}", max_bytes=1000)


def test_invalid_job_message_never_repeats_secret_values() -> None:
    raw = body(auth={"version": "3", "user": "u", "auth_key": "hunter2-secret-x", "priv_key": "s"})
    with pytest.raises(WireError) as info:
        wire.decode_job(raw)
    assert "hunter2" not in str(info.value)


def test_secrets_are_masked_in_repr_but_travel_in_the_body() -> None:
    job = wire.decode_job(body(auth={"version": "2c", "community": "s3cr3t-community"}))
    assert "s3cr3t-community" not in repr(job)
    assert b"s3cr3t-community" in wire.encode(job)


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"version": "2c"}, "community"),
        ({"version": "3"}, "user"),
        (
            {"version": "3", "user": "u", "security_level": "authPriv", "auth_key": "12345678"},
            "priv_key",
        ),
        ({"version": "3", "user": "u", "auth_key": "short"}, "8 characters"),
    ],
)
def test_snmp_auth_needs_what_its_version_needs(auth: dict[str, Any], message: str) -> None:
    with pytest.raises(WireError, match=message):
        wire.decode_job(body(auth=auth))


def test_auth_and_credential_ref_are_exclusive() -> None:
    with pytest.raises(WireError, match="exactly one"):
        wire.decode_job(body(credential_ref="core-v2"))
    job = json.loads(body())
    del job["auth"]
    job["credential_ref"] = "core-v2"
    assert wire.decode_job(json.dumps(job).encode()).credential_ref == "core-v2"


def test_snmp_set_is_not_idempotent_by_default() -> None:
    job = json.loads(body(kind="snmp.set"))
    job["params"] = {
        "varbinds": [{"oid": "1.3.6.1.2.1.1.6.0", "type": "OctetString", "value": "x"}]
    }
    del job["idempotent"]
    assert wire.decode_job(json.dumps(job).encode()).idempotent is False


def test_oids_are_normalised_and_checked() -> None:
    job = wire.decode_job(body(params={"oids": [".1.3.6.1.2.1.1.5.0"]}))
    assert isinstance(job, wire.SnmpGetJob)
    assert job.params.oids == ["1.3.6.1.2.1.1.5.0"]
    with pytest.raises(WireError):
        wire.decode_job(body(params={"oids": ["iso.3.6"]}))


def test_timestamps_are_utc_milliseconds_with_z() -> None:
    job = wire.decode_job(body(not_after="2026-11-23T12:00:00.123456+02:00"))
    assert b'"not_after":"2026-11-23T10:00:00.123Z"' in wire.encode(job)


def test_names_follow_the_design() -> None:
    assert wire.jobs_queue("7") == "usm_poller-sat-7"
    assert wire.dead_letter_queue("7") == "usm_poller-sat-7.dlq"
    assert wire.jobs_exchange() == "usm_poller.jobs"
    assert wire.dead_letter_exchange() == "usm_poller.dlx"
    assert wire.results_exchange() == wire.results_queue() == "usm_poller.results"
    assert wire.events_exchange() == "usm_poller.events"
    assert wire.result_routing_key("7", "snmp.get") == "result.7.snmp.get"
    assert wire.reply_routing_key("7", "amq.gen-x") == "reply.7.amq.gen-x"
    assert wire.heartbeat_routing_key("7") == "heartbeat.7"
    assert wire.event_routing_key("7", "started") == "event.7.started"
    assert wire.interactive_queue("7") == "usm_poller-sat-7.interactive"
    assert wire.interactive_routing_key("7") == "7.interactive"
    assert wire.lane_routing_key("7", "interactive") == "7.interactive"
    assert wire.lane_routing_key("7", "bulk") == "7"
    assert wire.LANE_HEADER == "x-lane"
    with pytest.raises(ValueError, match="satellite id"):
        wire.jobs_queue("bad id")
    with pytest.raises(ValueError, match="satellite id"):
        wire.interactive_routing_key("a.b")


HEARTBEAT = {
    "v": 1,
    "satellite_id": "7",
    "worker": "w",
    "version": "0.1.0",
    "hostname": "h",
    "started_at": "2026-11-23T09:00:00.000Z",
    "sent_at": "2026-11-23T10:00:00.000Z",
    "concurrency": 64,
    "in_flight": 3,
    "jobs_ok": 10,
    "jobs_error": 1,
    "jobs_per_s": 2.5,
    "loop_lag_ms": 0.4,
    "rss_bytes": 80_000_000,
    "quarantine": [],
}


def test_heartbeat_of_an_older_poller_reads_without_the_recycle_fields() -> None:
    beat = wire.Heartbeat.model_validate_json(json.dumps(HEARTBEAT))
    assert (beat.recycles, beat.last_recycle) == (0, None)


def test_heartbeat_round_trips_with_its_recycles() -> None:
    beat = wire.Heartbeat.model_validate(HEARTBEAT | {"recycles": 3, "last_recycle": "rss"})
    again = wire.Heartbeat.model_validate_json(wire.encode(beat))
    assert again == beat
    assert (again.recycles, again.last_recycle) == (3, "rss")


def test_heartbeat_fields_a_reader_does_not_know_are_ignored() -> None:
    # A core reads the heartbeats of pollers newer than itself (jobs, unlike heartbeats,
    # refuse unknown fields).
    later = HEARTBEAT | {"recycles": 1, "last_recycle": "uptime", "lanes": {"interactive": 2}}
    beat = wire.Heartbeat.model_validate_json(json.dumps(later))
    assert (beat.recycles, beat.last_recycle) == (1, "uptime")
    assert "lanes" not in beat.model_dump()


def test_queue_arguments_for_quorum_and_classic() -> None:
    quorum = wire.jobs_queue_arguments("7")
    assert quorum == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 20,
        "x-dead-letter-exchange": "usm_poller.dlx",
        "x-dead-letter-routing-key": "7",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    classic = wire.jobs_queue_arguments("7", "classic")
    assert classic == {"x-dead-letter-exchange": "usm_poller.dlx", "x-dead-letter-routing-key": "7"}


# ------------------------------------------------------------------------------------------
# The fast paths give what the plain spellings gave


def _isoformat_timestamp(value: datetime) -> str:
    """The spelling `format_timestamp` had before it was made faster."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
        ),
    )
)
@settings(max_examples=500)
def test_format_timestamp_is_isoformat_in_utc_with_milliseconds(value: datetime) -> None:
    assert wire.format_timestamp(value) == _isoformat_timestamp(value)


@given(strategies.jobs)
@settings(max_examples=200)
def test_encode_gives_the_bytes_of_model_dump_json_for_jobs(job: wire.JobRequest) -> None:
    assert wire.encode(job) == job.model_dump_json().encode()


@given(strategies.results())
@settings(max_examples=200)
def test_encode_gives_the_bytes_of_model_dump_json_for_results(result: wire.JobResult) -> None:
    assert wire.encode(result) == result.model_dump_json().encode()


_awkward = ["\x7f", "\x01", "\n", "é", "漢", "\U0001f600", "a", '"', "\\"]
_meta_leaf = st.one_of(
    strategies.json_leaf,
    st.text(st.sampled_from(_awkward), max_size=40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e15, -1e15, 1e16, 1e-7, 5e-324, 2**70]),
)
_meta_values = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        _meta_leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=10), st.dictionaries(st.text(max_size=8), inner, max_size=6)
        ),
        max_leaves=20,
    ),
    max_size=6,
)


def _agrees_with_json_dumps(value: dict[str, Any]) -> None:
    chars = len(json.dumps(value))
    assert chars <= wire._DUMPS_CHARS_PER_COMPACT_BYTE * len(pydantic_core.to_json(value))
    assert wire._meta_is_small(value) is (chars <= wire.MAX_META_BYTES)


@given(_meta_values)
@settings(max_examples=150)
def test_meta_size_check_agrees_with_json_dumps(value: dict[str, Any]) -> None:
    _agrees_with_json_dumps(value)


@given(st.text(st.sampled_from(_awkward), min_size=2000, max_size=6000), st.integers(0, 2))
@settings(max_examples=100)
def test_meta_size_check_agrees_with_json_dumps_on_large_metas(text: str, copies: int) -> None:
    _agrees_with_json_dumps({"k": text, "more": [text[: len(text) // 3]] * copies})


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_meta_size_limit_is_on_json_dumps_text(extra: int) -> None:
    # {"k": "xxx..."} is 9 characters around the value in json.dumps; \x7f takes 6 there.
    escaped = (wire.MAX_META_BYTES - 9 + extra) // 6
    meta = {"k": "\x7f" * escaped + "x" * ((wire.MAX_META_BYTES - 9 + extra) % 6)}
    assert len(json.dumps(meta)) == wire.MAX_META_BYTES + extra
    if extra > 0:
        with pytest.raises(WireError, match="meta is larger"):
            wire.decode_job(body(meta=meta))
    else:
        assert wire.decode_job(body(meta=meta)).meta == meta


def test_bad_oid_message_is_unchanged() -> None:
    with pytest.raises(WireError) as info:
        wire.decode_job(body(params={"oids": ["1.3.6.1.2.1.1.5.0", "1.3.x"]}))
    assert info.value.message == (
        "invalid job: params.oids: Value error, not a numeric OID such as 1.3.6.1.2.1.1.5.0"
    )


# ------------------------------------------------------------------------------------------
# Kinds without credentials, and where tcp.connect finds its port


def _bare(kind: str, **fields: Any) -> bytes:
    job: dict[str, Any] = {"v": 1, "id": "u-1", "kind": kind, "target": {"host": "10.0.0.1"}}
    return json.dumps(job | fields).encode()


@pytest.mark.parametrize("kind", ["icmp.ping", "tcp.connect"])
@pytest.mark.parametrize("auth", [{}, None])
def test_empty_or_null_auth_is_accepted_for_kinds_without_credentials(
    kind: str, auth: dict[str, Any] | None
) -> None:
    params = {"port": 22} if kind == "tcp.connect" else {}
    job = wire.decode_job(_bare(kind, auth=auth, params=params))
    assert job.kind == kind
    assert b'"auth"' not in wire.encode(job)  # what older pollers refuse is never written


@pytest.mark.parametrize("kind", ["icmp.ping", "tcp.connect"])
@pytest.mark.parametrize(
    "auth", [{"community": "s3cr3t-community"}, {"version": "2c"}, "s3cr3t-community", [], 0]
)
def test_non_empty_auth_is_refused_for_kinds_without_credentials(kind: str, auth: object) -> None:
    raw = _bare(kind, auth=auth, params={"port": 22})
    with pytest.raises(WireError) as info:
        wire.decode_job(raw)
    assert info.value.error_code == "invalid_job"
    assert info.value.job_id == "u-1"
    assert "auth: " in info.value.message
    assert "s3cr3t" not in info.value.message


def test_credential_ref_is_still_refused_for_kinds_without_credentials() -> None:
    with pytest.raises(WireError, match="takes no credentials"):
        wire.decode_job(_bare("icmp.ping", credential_ref="core-v2"))


def _tcp(target_port: int | None, params: dict[str, Any] | None) -> wire.TcpConnectJob:
    fields: dict[str, Any] = {"target": {"host": "10.0.0.1", "port": target_port}}
    if params is not None:
        fields["params"] = params
    job = wire.decode_job(_bare("tcp.connect", **fields))
    assert isinstance(job, wire.TcpConnectJob)
    return job


def test_tcp_connect_takes_its_port_from_the_target() -> None:
    assert _tcp(443, None).params.port == 443
    assert _tcp(443, {}).params.port == 443
    assert _tcp(443, {"port": None}).params.port == 443


def test_tcp_connect_params_port_wins_over_the_target_port() -> None:
    assert _tcp(443, {"port": 22}).params.port == 22
    assert _tcp(None, {"port": 22}).params.port == 22


def test_tcp_connect_job_from_the_target_port_is_written_with_params_port() -> None:
    """What a poller that reads only `params.port` accepts, and the same job read back."""
    job = _tcp(443, None)
    written = json.loads(wire.encode(job))
    assert written["params"] == {"port": 443}
    assert written["target"]["port"] == 443
    assert wire.decode_job(wire.encode(job)) == job


@pytest.mark.parametrize("params", [None, {}, {"port": None}])
def test_tcp_connect_without_any_port_names_both_fields(params: dict[str, Any] | None) -> None:
    with pytest.raises(WireError) as info:
        _tcp(None, params)
    assert info.value.error_code == "invalid_job"
    assert info.value.job_id == "u-1"
    assert "target.port" in info.value.message
    assert "params.port" in info.value.message


@pytest.mark.parametrize("port", [0, 65536, "x"])
def test_tcp_connect_bad_target_port_is_refused(port: object) -> None:
    raw = _bare("tcp.connect", target={"host": "10.0.0.1", "port": port})
    with pytest.raises(WireError) as info:
        wire.decode_job(raw)
    assert "target.port" in info.value.message


def test_tcp_connect_built_from_models_finds_its_port_in_either_place() -> None:
    target = wire.Target(host="h", port=443)
    params = wire.TcpParams(port=22)
    built = wire.TcpConnectJob(v=1, id="m", kind="tcp.connect", target=target, params=params)
    assert built.params.port == 22
    fields = {"v": 1, "id": "m", "kind": "tcp.connect", "target": target}
    assert wire.TcpConnectJob.model_validate(fields).params.port == 443


# --------------------------------------------------------------------------------------------
# build_result: JobResult(**fields), with the usual data checked in pydantic-core alone


class _Text(str):
    __slots__ = ()


class _Whole(int):
    pass


class _Real(float):
    pass


class _Rows(list[Any]):
    pass


class _Object(dict[str, Any]):
    pass


class _Kind(StrEnum):
    GET = "snmp.get"


class _Number(IntEnum):
    ONE = 1


#: Values `JsonValue` reads (subclasses too, which it turns into their base type) and values it
#: refuses (a tuple, bytes, a set, other objects, non-str keys), at any depth.
_odd_leaf = st.one_of(
    strategies.json_leaf,
    st.floats(),  # nan and infinities too
    st.integers().map(_Whole),
    st.floats(allow_nan=False).map(_Real),
    strategies.text.map(_Text),
    st.sampled_from([_Kind.GET, _Number.ONE, (1,), b"x", frozenset(), object(), 2**80]),
)
_odd_values = st.recursive(
    _odd_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(_Rows),
        st.dictionaries(
            st.one_of(strategies.names, strategies.names.map(_Text)), inner, max_size=3
        ),
        st.dictionaries(strategies.names, inner, max_size=3).map(_Object),
        st.dictionaries(st.integers(0, 3), inner, min_size=1, max_size=2),
    ),
    max_leaves=8,
)
#: Data as the drivers write it (the shape `build_result` checks in pydantic-core alone).
_varbinds = st.fixed_dictionaries(
    {
        "varbinds": st.lists(
            st.fixed_dictionaries(
                {
                    "oid": strategies.text,
                    "type": st.sampled_from(["OctetString", "Counter32", "Null"]),
                    "value": st.one_of(st.none(), strategies.text, st.integers()),
                },
                optional={"hex": strategies.text},
            ),
            max_size=4,
        )
    },
    optional={"truncated": st.booleans()},
)


def _fields(data: object, **changes: object) -> wire.ResultFields:
    started = datetime(2026, 11, 23, 9, 59, 58, 120000, tzinfo=UTC)
    fields: dict[str, object] = {
        "job_id": "5e0b2c1e",
        "kind": "snmp.get",
        "satellite_id": "7",
        "worker": "poller-3f9a",
        "status": "ok",
        "data": data,
        "error": None,
        "attempt": 1,
        "redelivered": False,
        "started_at": started,
        "finished_at": started + timedelta(milliseconds=15),
        "duration_ms": 15.1,
        "meta": {"device_id": 1532},
    }
    return cast("wire.ResultFields", fields | changes)


def _built(build: Callable[[], wire.JobResult]) -> wire.JobResult | list[Any]:
    """What `build` gives: its result, or the errors it raises."""
    try:
        return build()
    except ValidationError as exc:
        return list(exc.errors())


def _same_as_the_model(fields: wire.ResultFields) -> None:
    """`build_result(fields)` is `JobResult(**fields)`: the same result, or the same errors."""
    expected = _built(lambda: wire.JobResult(**fields))
    built = _built(lambda: wire.build_result(fields))
    assert type(built) is type(expected)
    assert built == expected
    if isinstance(built, wire.JobResult):
        assert isinstance(expected, wire.JobResult)
        assert built.model_fields_set == expected.model_fields_set
        assert wire.encode(built) == wire.encode(expected)
        assert repr(built.data) == repr(expected.data)  # the same types: str, not a subclass


@given(st.one_of(st.none(), _varbinds, st.dictionaries(strategies.names, _odd_values, max_size=3)))
@settings(max_examples=400)
def test_build_result_is_the_model_for_any_data(data: object) -> None:
    _same_as_the_model(_fields(data))


@given(_varbinds | strategies.json_values.filter(lambda v: isinstance(v, dict)))
@settings(max_examples=100)
def test_build_result_of_any_valid_data_takes_the_quick_path(data: dict[str, Any]) -> None:
    assert wire._QUICK_RESULT is not None
    built = wire._QUICK_RESULT.validate_python(_fields(data))
    assert wire.encode(built) == wire.encode(wire.JobResult(**_fields(data)))


def test_build_result_checks_driver_data_without_calling_python() -> None:
    """`JsonValue` calls a Python function for every value; the quick path calls none."""
    called: list[str] = []

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        if event == "call":
            called.append(frame.f_code.co_name)

    varbind = {"oid": "1.3.6.1.2.1.1.5.0", "type": "OctetString", "value": "sw", "hex": "7377"}
    fields = _fields({"varbinds": [varbind]})  # meta {"device_id": 1532}
    sys.setprofile(profile)
    try:
        wire.build_result(fields)
    finally:
        sys.setprofile(None)
    assert called == ["build_result"]
    assert wire.encode(wire.build_result(fields)) == wire.encode(wire.JobResult(**fields))


@pytest.mark.parametrize(
    "changes",
    [
        {"attempt": 0},
        {"status": "maybe"},
        {"started_at": datetime(2026, 11, 23)},  # naive
        {"meta": {"x": (1, 2)}},
        {"data": {"varbinds": [{"oid": b"1.3"}]}},
        {"data": {"varbinds": [{"oid": "1.3", "value": object()}]}},
        {"data": {"x": {1: "y"}}},
    ],
)
def test_build_result_raises_what_the_model_raises(changes: dict[str, object]) -> None:
    fields = _fields({"varbinds": []}) | changes
    with pytest.raises(ValidationError):
        wire.JobResult(**fields)
    _same_as_the_model(cast("wire.ResultFields", fields))
