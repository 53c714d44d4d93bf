"""The fleet page's rows: attention level and order (satellite/service/web/overview.py), and the
login and CSRF rules of the pages (satellite/service/web/session.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from starlette.requests import Request

from poller import __version__
from poller.wire import Heartbeat, QuarantineEntry
from satellite.service.web import session
from satellite.service.web.history import SatelliteHistory
from satellite.service.web.overview import Row, attention_order, make_row
from satellite.status import FleetView, satellite_status

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def beat(sid: str, *, version: str = __version__, quarantine: list[str] | None = None) -> Heartbeat:
    return Heartbeat(
        satellite_id=sid,
        worker=f"w-{sid}",
        version=version,
        hostname="h",
        started_at=NOW - timedelta(hours=1),
        sent_at=NOW,
        concurrency=10,
        in_flight=0,
        jobs_ok=0,
        jobs_error=0,
        jobs_per_s=0.0,
        loop_lag_ms=0.1,
        rss_bytes=1,
        quarantine=[
            QuarantineEntry(device=d, since=NOW, until=NOW, last_error="timeout")
            for d in quarantine or []
        ],
    )


def row(
    sid: str,
    *,
    consumers: int = 1,
    heartbeat: Heartbeat | None = None,
    beating: bool = True,
    dead: int = 0,
    ready: int = 0,
    history: SatelliteHistory | None = None,
) -> Row:
    fleet = FleetView()
    if beating:
        fleet.add(heartbeat or beat(sid))
    queue: dict[str, Any] = {
        "name": f"usm_poller-sat-{sid}",
        "messages_ready": ready,
        "consumers": consumers,
    }
    status = satellite_status(
        sid,
        queue=queue,
        dlq={"messages": dead},
        fleet=fleet,
        core_version=__version__,
    )
    return make_row(status, None, history, NOW)


def test_levels_and_reasons() -> None:
    assert row("ok").level == "ok"
    assert row("ok").reasons == []
    stopped = row("stopped", consumers=0, beating=False)
    assert stopped.level == "critical"
    assert stopped.reasons[:2] == ["no consumer on the job queue", "no heartbeat"]
    assert row("dlq", dead=3).reasons == ["DLQ 3"]
    assert row("dlq", dead=3).level == "warning"
    skewed = row("old", heartbeat=beat("old", version="0.0.1"))
    assert (skewed.level, skewed.reasons, skewed.versions) == (
        "warning",
        ["version skew"],
        ["0.0.1"],
    )
    quarantined = row("q", heartbeat=beat("q", quarantine=["10.0.0.1", "10.0.0.2"]))
    assert quarantined.reasons == ["2 quarantined"]
    assert quarantined.quarantined == ["10.0.0.1", "10.0.0.2"]
    overdue = row("late", history=SatelliteHistory(overdue=4))
    assert (overdue.level, overdue.reasons) == ("critical", ["4 overdue"])


def test_an_error_rate_warns_only_above_a_share_of_enough_answers() -> None:
    few = SatelliteHistory(answered=4, errors={"timeout": 4})
    assert row("few", history=few).level == "ok"  # 4 answers are too few to judge
    many = SatelliteHistory(answered=10, errors={"timeout": 2, "auth_failed": 1})
    assert row("many", history=many).reasons == ["errors 30%"]
    low = SatelliteHistory(answered=10, errors={"timeout": 2})
    assert row("low", history=low).level == "ok"


def test_the_oldest_job_age_comes_from_the_history() -> None:
    waiting = SatelliteHistory(queued=2, oldest_queued_at=NOW - timedelta(seconds=90))
    assert row("w", history=waiting).oldest_age_s == 90.0
    assert row("none").oldest_age_s is None


def test_attention_order_puts_what_needs_a_person_first_whatever_the_ids() -> None:
    rows = [
        row("a-ok"),
        row("b-dlq-small", dead=1),
        row("c-stopped", consumers=0, beating=False),
        row("d-dlq-big", dead=9),
        row("e-overdue", history=SatelliteHistory(overdue=1)),
        row("f-ok-backlog", ready=5),
        row("g-stopped-dlq", consumers=0, beating=False, dead=2),
    ]
    assert [r.satellite_id for r in attention_order(rows)] == [
        "g-stopped-dlq",  # critical with the most reasons
        "c-stopped",
        "e-overdue",
        "d-dlq-big",  # warnings: the bigger DLQ first
        "b-dlq-small",
        "f-ok-backlog",  # ok: the backlog first
        "a-ok",
    ]


def request(headers: dict[str, str], *, unix: bool = False) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/x",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "server": ("/run/api.sock", None) if unix else ("127.0.0.1", 8480),
        "scheme": "http",
        "query_string": b"",
    }
    return Request(scope)


def test_csrf_needs_the_cookie_repeated_and_the_same_origin() -> None:
    value = "c" * 43
    cookie = {"cookie": f"usm_csrf={value}", "host": "core:8480"}
    session.check_csrf(request(cookie), {"csrf": value})
    session.check_csrf(request(cookie | {"origin": "http://core:8480"}), {"csrf": value})
    for headers, form in (
        (cookie, {}),
        (cookie, {"csrf": "d" * 43}),
        ({"host": "core:8480"}, {"csrf": value}),
        (cookie | {"origin": "http://evil.example"}, {"csrf": value}),
        (cookie | {"origin": "null"}, {"csrf": value}),
    ):
        with pytest.raises(session.CsrfError):
            session.check_csrf(request(headers), form)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/satellites/s1?x=1", "/satellites/s1?x=1"),
        (None, "/"),
        ("", "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("jobs", "/"),
    ],
)
def test_after_login_only_a_local_path(target: str | None, expected: str) -> None:
    assert session.safe_next(target) == expected


def test_the_cookie_is_secure_over_https_or_from_the_socket_proxy_only() -> None:
    https = {"x-forwarded-proto": "https"}
    assert session.secure(request(https, unix=True))
    assert not session.secure(request(https))  # anyone on TCP could send the header
    assert not session.secure(request({}, unix=True))
