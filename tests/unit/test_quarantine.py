"""The dead-device circuit breaker on its own, with a hand-driven clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from poller.errors import DeviceQuarantinedError, DeviceUnreachableError
from poller.quarantine import SILENCE_EVIDENCE, Change, Outcome, Quarantine, classify, weigh

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> Quarantine:
    return Quarantine(after=3, cooldown=30, max_cooldown=100, clock=clock)


def until(breaker: Quarantine, device: str) -> float:
    end = breaker.until(device)
    assert end is not None
    return end.timestamp()


def time_out(breaker: Quarantine, device: str, times: int = 1) -> list[Change | None]:
    changes = []
    for _ in range(times):
        ticket = breaker.admit(device)
        changes.append(breaker.settle(ticket, Outcome.TIMEOUT, "no answer within 5 s"))
    return changes


def test_three_consecutive_timeouts_quarantine_the_device(breaker: Quarantine) -> None:
    assert time_out(breaker, "10.0.0.1", 2) == [None, None]
    assert not breaker.is_quarantined("10.0.0.1")
    assert time_out(breaker, "10.0.0.1") == [Change.QUARANTINED]
    assert breaker.is_quarantined("10.0.0.1")
    assert not breaker.is_quarantined("10.0.0.2")
    breaker.admit("10.0.0.2")  # other devices are not affected


def test_a_sign_of_life_resets_the_count(breaker: Quarantine) -> None:
    time_out(breaker, "d", 2)
    assert breaker.settle(breaker.admit("d"), Outcome.ALIVE) is None
    assert time_out(breaker, "d", 2) == [None, None]
    assert not breaker.is_quarantined("d")


def test_neutral_outcomes_neither_count_nor_reset(breaker: Quarantine) -> None:
    time_out(breaker, "d", 2)
    breaker.settle(breaker.admit("d"), Outcome.NEUTRAL)
    assert time_out(breaker, "d") == [Change.QUARANTINED]


def test_quarantined_jobs_are_refused_at_once_with_a_retryable_unreachable(
    breaker: Quarantine,
) -> None:
    time_out(breaker, "10.9.8.7", 3)
    with pytest.raises(DeviceQuarantinedError) as info:
        breaker.admit("10.9.8.7")
    exc = info.value
    assert isinstance(exc, DeviceUnreachableError)
    assert (exc.code, exc.retryable) == ("device_unreachable", True)
    until = datetime.fromtimestamp(T0 + 30, UTC).isoformat(timespec="milliseconds")
    assert f"quarantined until {until.replace('+00:00', 'Z')}" in exc.message
    assert "10.9.8.7" in exc.message
    assert "3 consecutive timeouts" in exc.message


def test_one_probe_after_the_cool_down_and_others_still_refused(
    breaker: Quarantine, clock: Clock
) -> None:
    time_out(breaker, "d", 3)
    clock.now += 29.9
    with pytest.raises(DeviceQuarantinedError):
        breaker.admit("d")
    clock.now += 0.1
    probe = breaker.admit("d")
    assert probe.probe
    with pytest.raises(DeviceQuarantinedError) as info:
        breaker.admit("d")
    assert "a probe job is checking it now" in info.value.message
    assert breaker.settle(probe, Outcome.ALIVE) is Change.RELEASED
    assert not breaker.is_quarantined("d")
    assert not breaker.admit("d").probe
    assert breaker.entries() == []


def test_a_failed_probe_doubles_the_cool_down_up_to_the_maximum(
    breaker: Quarantine, clock: Clock
) -> None:
    time_out(breaker, "d", 3)
    cooldowns = []
    for _ in range(4):
        start = clock.now
        clock.now = until(breaker, "d")
        cooldowns.append(round(clock.now - start))
        probe = breaker.admit("d")
        assert probe.probe
        assert breaker.settle(probe, Outcome.TIMEOUT, "still dead") is Change.EXTENDED
    clock.now = until(breaker, "d")
    assert cooldowns == [30, 60, 100, 100]
    (entry,) = breaker.entries()
    assert entry.device == "d"
    assert entry.since == datetime.fromtimestamp(T0, UTC)
    assert entry.last_error == "still dead"


def test_a_probe_without_evidence_lets_the_next_job_probe(
    breaker: Quarantine, clock: Clock
) -> None:
    time_out(breaker, "d", 3)
    clock.now += 30
    probe = breaker.admit("d")
    assert breaker.settle(probe, Outcome.NEUTRAL) is None
    assert breaker.is_quarantined("d")
    assert breaker.admit("d").probe


def test_late_timeouts_of_jobs_started_before_the_quarantine_do_not_extend_it(
    breaker: Quarantine,
) -> None:
    tickets = [breaker.admit("d") for _ in range(4)]
    changes = [breaker.settle(t, Outcome.TIMEOUT, "x") for t in tickets]
    assert changes == [None, None, Change.QUARANTINED, None]
    assert breaker.until("d") == datetime.fromtimestamp(T0 + 30, UTC)


def test_a_job_that_waited_is_refused_once_its_device_is_quarantined(
    breaker: Quarantine,
) -> None:
    waiting = breaker.admit("d")
    time_out(breaker, "d", 3)
    with pytest.raises(DeviceQuarantinedError):
        breaker.check(waiting)
    breaker.settle(waiting, Outcome.NEUTRAL)
    assert breaker.is_quarantined("d")


def test_a_late_success_releases_the_device(breaker: Quarantine) -> None:
    running = breaker.admit("d")
    time_out(breaker, "d", 3)
    assert breaker.settle(running, Outcome.ALIVE) is Change.RELEASED
    breaker.admit("d")


def test_entries_list_every_quarantined_device_oldest_first(
    breaker: Quarantine, clock: Clock
) -> None:
    time_out(breaker, "b", 3)
    clock.now += 1
    time_out(breaker, "a", 3)
    time_out(breaker, "c", 2)
    entries = breaker.entries()
    assert [e.device for e in entries] == ["b", "a"]
    assert entries[1].until == datetime.fromtimestamp(T0 + 31, UTC)
    assert entries[0].last_error == "no answer within 5 s"
    assert breaker.entries(limit=1) == entries[:1]


def test_zero_turns_the_breaker_off(clock: Clock) -> None:
    off = Quarantine(after=0, clock=clock)
    assert time_out(off, "d", 10) == [None] * 10
    assert off.entries() == []


def test_memory_stays_bounded_by_forgetting_idle_counters(clock: Clock) -> None:
    small = Quarantine(after=3, clock=clock, max_tracked=10)
    time_out(small, "dead", 3)
    for n in range(100):
        clock.now += 1
        time_out(small, f"flaky-{n}")
    assert len(small._records) <= 10
    assert small.is_quarantined("dead")


@pytest.mark.parametrize(
    ("code", "kind", "data", "expected"),
    [
        (None, "snmp.get", {"varbinds": []}, Outcome.ALIVE),
        ("device_timeout", "snmp.get", None, Outcome.TIMEOUT),
        ("device_unreachable", "tcp.connect", {"connected": False}, Outcome.ALIVE),
        ("auth_failed", "ssh.exec", None, Outcome.ALIVE),
        ("snmp_error", "snmp.get", None, Outcome.ALIVE),
        ("expired", "snmp.get", None, Outcome.NEUTRAL),
        ("credential_not_found", "snmp.get", None, Outcome.NEUTRAL),
        ("ping_not_permitted", "icmp.ping", None, Outcome.NEUTRAL),
        (None, "icmp.ping", {"sent": 3, "received": 0}, Outcome.NEUTRAL),
        (None, "icmp.ping", {"sent": 3, "received": 1}, Outcome.ALIVE),
    ],
)
def test_classify_reads_outcomes_as_the_docs_say(
    code: str | None, kind: str, data: dict[str, int] | None, expected: Outcome
) -> None:
    assert classify(code, kind, data) is expected


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="cooldown"):
        Quarantine(cooldown=60, max_cooldown=30)


@pytest.mark.parametrize(
    ("outcome", "silent_for", "timeout", "expected"),
    [
        (Outcome.TIMEOUT, 0.005, 10.0, Outcome.NEUTRAL),  # started just before its deadline
        (Outcome.TIMEOUT, SILENCE_EVIDENCE - 0.01, 10.0, Outcome.NEUTRAL),
        (Outcome.TIMEOUT, SILENCE_EVIDENCE, 10.0, Outcome.TIMEOUT),
        (Outcome.TIMEOUT, 0.25, 0.5, Outcome.TIMEOUT),  # half of a short deadline is enough
        (Outcome.TIMEOUT, 0.2, 0.5, Outcome.NEUTRAL),
        (Outcome.ALIVE, 0.001, 10.0, Outcome.ALIVE),  # an answer is an answer, however quick
        (Outcome.NEUTRAL, 5.0, 10.0, Outcome.NEUTRAL),
    ],
)
def test_a_timeout_of_a_device_that_answered_counts_only_after_enough_silence(
    outcome: Outcome, silent_for: float, timeout: float, expected: Outcome
) -> None:
    assert weigh(outcome, silent_for, timeout, trusted=True) is expected
    # A device that has not answered yet: every outcome stands.
    assert weigh(outcome, silent_for, timeout, trusted=False) is outcome
