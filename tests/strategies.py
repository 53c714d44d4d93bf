"""Hypothesis strategies for the wire models (every job kind, results, heartbeats)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from poller import wire

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=30)
secrets = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=8, max_size=30)
oids = st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=20).map(
    lambda parts: ".".join(str(p) for p in [1, 3, *parts])
)
hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5})?\Z"),
)
timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    text,
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=4)),
    max_leaves=12,
)
meta = st.one_of(st.none(), st.dictionaries(names, json_values, max_size=4))


@st.composite
def snmp_auth(draw: st.DrawFn) -> dict[str, Any]:
    version = draw(st.sampled_from(["1", "2c", "3"]))
    if version != "3":
        return {"version": version, "community": draw(secrets)}
    level = draw(st.sampled_from(["noAuthNoPriv", "authNoPriv", "authPriv"]))
    auth: dict[str, Any] = {
        "version": "3",
        "user": draw(names),
        "security_level": level,
        "context": draw(st.sampled_from(["", "ctx1"])),
    }
    if level != "noAuthNoPriv":
        auth["auth_protocol"] = draw(st.sampled_from(["MD5", "SHA", "SHA256", "SHA512"]))
        auth["auth_key"] = draw(secrets)
    if level == "authPriv":
        auth["priv_protocol"] = draw(st.sampled_from(["DES", "AES", "AES192", "AES256"]))
        auth["priv_key"] = draw(secrets)
    return auth


cli_auth = st.fixed_dictionaries(
    {"username": names},
    optional={"password": secrets, "enable_password": secrets, "host_key": names},
)


@st.composite
def job_dicts(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([k.value for k in wire.JobKind]))
    job: dict[str, Any] = {
        "v": 1,
        "id": draw(st.text(min_size=1, max_size=128)),
        "kind": kind,
        "target": {"host": draw(hosts), "port": draw(st.one_of(st.none(), st.integers(1, 65535)))},
        "timeout": draw(st.floats(0.1, 3600)),
        "meta": draw(meta),
    }
    if draw(st.booleans()):
        job["not_after"] = wire.format_timestamp(draw(timestamps))
    if draw(st.booleans()):
        job["idempotent"] = draw(st.booleans())
    if kind.startswith("snmp."):
        job["auth"] = draw(snmp_auth())
        if kind == "snmp.set":
            vb = st.one_of(
                st.fixed_dictionaries(
                    {
                        "oid": oids,
                        "type": st.just("Integer"),
                        "value": st.integers(-(2**31), 2**31 - 1),
                    }
                ),
                st.fixed_dictionaries({"oid": oids, "type": st.just("OctetString"), "value": text}),
            )
            job["params"] = {"varbinds": draw(st.lists(vb, min_size=1, max_size=5))}
        elif kind == "snmp.walk":
            job["params"] = {
                "oids": draw(st.lists(oids, min_size=1, max_size=3)),
                "max_repetitions": draw(st.integers(1, 100)),
            }
        else:
            job["params"] = {"oids": draw(st.lists(oids, min_size=1, max_size=5))}
    elif kind in ("ssh.exec", "ssh.cli", "telnet.cli"):
        if draw(st.booleans()):
            job["auth"] = draw(cli_auth)
        else:
            job["credential_ref"] = draw(names)
        commands = draw(st.lists(st.text(min_size=1, max_size=50), min_size=1, max_size=4))
        job["params"] = (
            {"commands": commands}
            if kind == "ssh.exec"
            else {
                "commands": commands,
                "platform": draw(st.sampled_from(["generic", "cisco_ios"])),
                "enable": draw(st.booleans()),
            }
        )
    else:
        _add_uncredentialled(draw, job)
    return job


def _add_uncredentialled(draw: st.DrawFn, job: dict[str, Any]) -> None:
    """`auth` and `params` of `icmp.ping` and `tcp.connect`, the kinds without credentials."""
    # A core that sends every kind with the same keys sends {} or null.
    auth: object = draw(st.sampled_from(["absent", {}, None]))
    if auth != "absent":
        job["auth"] = auth
    if job["kind"] == "icmp.ping":
        job["params"] = {"count": draw(st.integers(1, 10)), "interval": 0.2, "size": 56}
        return
    # tcp.connect: the port in params, in the target, or in both (params wins).
    where = draw(st.sampled_from(["params", "target", "both"]))
    if where != "params":
        job["target"]["port"] = draw(st.integers(1, 65535))
    job["params"] = {"port": draw(st.integers(1, 65535))} if where != "target" else {}


jobs = job_dicts().map(lambda d: wire.decode_job(json.dumps(d).encode()))


@st.composite
def results(draw: st.DrawFn) -> wire.JobResult:
    started = draw(timestamps)
    ok = draw(st.booleans())
    return wire.JobResult(
        job_id=draw(st.text(min_size=1, max_size=128)),
        kind=draw(st.sampled_from([k.value for k in wire.JobKind])),
        satellite_id=draw(st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")),
        worker=draw(names),
        status="ok" if ok else "error",
        data=draw(st.one_of(st.none(), st.dictionaries(names, json_values, max_size=3))),
        error=None
        if ok
        else wire.ErrorInfo(
            code=draw(st.sampled_from(["device_timeout", "auth_failed", "snmp_error"])),
            message=draw(text),
            retryable=draw(st.booleans()),
        ),
        attempt=draw(st.integers(1, 50)),
        redelivered=draw(st.booleans()),
        started_at=started,
        finished_at=started + timedelta(milliseconds=draw(st.integers(0, 100_000))),
        duration_ms=draw(st.floats(0, 1e6, allow_nan=False)),
        meta=draw(meta),
    )
