"""Why a dead letter is in the DLQ, from its headers and body (pure: `satellite.dlq.diagnose`)."""

from __future__ import annotations

import json

import pytest

from satellite.dlq import POLLER_MAX_JOB_BYTES, diagnose

VALID = json.dumps(
    {"v": 1, "id": "j", "kind": "icmp.ping", "target": {"host": "192.0.2.1"}}
).encode()


@pytest.mark.parametrize(
    ("reason", "body", "code", "words"),
    [
        ("rejected", b"{not json", "invalid_job", "not valid UTF-8 JSON"),
        ("rejected", b"[1, 2]", "invalid_job", "JSON object"),
        ("rejected", json.dumps({"v": 9, "id": "j"}).encode(), "unsupported_version", "9"),
        ("rejected", json.dumps({"v": 1, "id": "j", "kind": "snmp.gett"}).encode(),
         "unknown_kind", "snmp.get"),
        ("rejected", VALID, "internal_error", "last allowed delivery"),
        ("rejected", b" " * (POLLER_MAX_JOB_BYTES + 1), "invalid_job", "USM_POLLER_MAX_JOB_BYTES"),
        ("delivery_limit", VALID, None, "poison job"),
        ("expired", VALID, None, "expiration"),
        ("maxlen", VALID, None, "full queue"),
    ],
)  # fmt: skip
def test_diagnose(reason: str, body: bytes, code: str | None, words: str) -> None:
    got_code, why = diagnose(reason, body)
    assert got_code == code
    assert words in why
