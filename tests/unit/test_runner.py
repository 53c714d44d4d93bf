"""The runner with an in-memory driver: delivery rules, deadlines, per-device limits."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from poller import wire
from poller.credentials import CredentialStore
from poller.drivers.base import Auth, Data, JobContext
from poller.errors import DeviceAuthError, SnmpError
from poller.pacing import LaneFirst
from poller.quarantine import Quarantine
from poller.runner import Attempt, NotStarted, Runner
from poller.wire import JobKind, JobRequest


class MemoryDriver:
    """Answers from a script keyed by host: a value, an exception, or a delay."""

    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.SNMP_GET, JobKind.SNMP_SET})

    def __init__(self) -> None:
        self.calls: list[tuple[str, Auth | None]] = []
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.delay = 0.0

    async def run(self, job: JobRequest, auth: Auth | None, ctx: JobContext) -> Data:
        host = job.target.host
        self.calls.append((host, auth))
        self.active[host] = self.active.get(host, 0) + 1
        self.peak[host] = max(self.peak.get(host, 0), self.active[host])
        try:
            if host.startswith("sleepy"):
                await asyncio.sleep(3600)
            if host == "bad-auth":
                raise DeviceAuthError("wrong v3 auth key")
            if host == "partial":
                raise SnmpError("noSuchName at index 2", data={"varbinds": [{"oid": "1.3"}]})
            if host == "buggy":
                raise RuntimeError("driver bug")
            if host == "not-json":  # a driver bug: data that is not JSON
                varbind: dict[str, Any] = {"oid": "1.3", "type": "OctetString", "value": b"sw"}
                return {"varbinds": [varbind]}
            if host == "unguarded" and not ctx.guarded:
                raise RuntimeError("the runner must guard the deadline it gives a driver")
            await asyncio.sleep(self.delay)
            return {"varbinds": [], "remaining": round(ctx.remaining())}
        finally:
            self.active[host] -= 1

    async def aclose(self) -> None:
        pass


def make_job(host: str = "10.0.0.1", **changes: Any) -> JobRequest:
    job = {
        "v": 1,
        "id": "job-1",
        "kind": "snmp.get",
        "target": {"host": host},
        "auth": {"version": "2c", "community": "public"},
        "params": {"oids": ["1.3.6.1.2.1.1.5.0"]},
        "timeout": 5,
        "meta": {"device_id": 7},
    } | changes
    return wire.decode_job(json.dumps(job).encode())


@pytest.fixture
def driver() -> MemoryDriver:
    return MemoryDriver()


@pytest.fixture
def runner(driver: MemoryDriver) -> Runner:
    store = CredentialStore({"core": wire.SnmpAuth(version="2c", community="from-file")})
    return Runner(
        drivers={"snmp.get": driver, "snmp.set": driver},
        credentials=store,
        satellite_id="7",
        worker="w1",
        per_device_concurrency=2,
    )


async def test_success_builds_an_ok_result(runner: Runner) -> None:
    result = await runner.run(make_job())
    assert result.status == "ok"
    assert result.error is None
    assert result.job_id == "job-1"
    assert result.satellite_id == "7"
    assert result.worker == "w1"
    assert result.meta == {"device_id": 7}
    assert result.attempt == 1
    assert not result.redelivered
    assert result.data == {"varbinds": [], "remaining": 5}


async def test_device_error_becomes_error_result_with_partial_data(runner: Runner) -> None:
    result = await runner.run(make_job("partial"))
    assert result.status == "error"
    assert result.error == wire.ErrorInfo(
        code="snmp_error", message="noSuchName at index 2", retryable=False
    )
    assert result.data == {"varbinds": [{"oid": "1.3"}]}


async def test_auth_failure_is_not_retryable(runner: Runner) -> None:
    result = await runner.run(make_job("bad-auth"))
    assert result.error is not None
    assert (result.error.code, result.error.retryable) == ("auth_failed", False)


async def test_deadline_turns_into_device_timeout(runner: Runner) -> None:
    t0 = asyncio.get_running_loop().time()
    result = await runner.run(make_job("sleepy", timeout=0.3))
    elapsed = asyncio.get_running_loop().time() - t0
    assert result.error is not None
    assert (result.error.code, result.error.retryable) == ("device_timeout", True)
    assert 0.3 <= elapsed < 0.6


async def test_expired_job_is_not_run(runner: Runner, driver: MemoryDriver) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    result = await runner.run(make_job(not_after=past))
    assert result.error is not None
    assert result.error.code == "expired"
    assert driver.calls == []


async def test_not_after_shortens_the_deadline(runner: Runner) -> None:
    soon = (datetime.now(UTC) + timedelta(seconds=0.3)).isoformat()
    result = await runner.run(make_job("sleepy", not_after=soon, timeout=30))
    assert result.error is not None
    assert result.error.code == "device_timeout"


async def test_redelivered_non_idempotent_job_is_outcome_unknown(
    runner: Runner, driver: MemoryDriver
) -> None:
    job = make_job(
        kind="snmp.set",
        params={"varbinds": [{"oid": "1.3.6.1.2.1.1.6.0", "type": "OctetString", "value": "x"}]},
    )
    result = await runner.run(job, Attempt(number=2, redelivered=True))
    assert result.error is not None
    assert result.error.code == "outcome_unknown"
    assert (result.attempt, result.redelivered) == (2, True)
    assert driver.calls == []


async def test_redelivered_idempotent_job_runs_again(runner: Runner) -> None:
    result = await runner.run(make_job(), Attempt(number=3, redelivered=True))
    assert result.status == "ok"
    assert (result.attempt, result.redelivered) == (3, True)


async def test_credential_ref_is_resolved_from_the_store(
    runner: Runner, driver: MemoryDriver
) -> None:
    job = json.loads(wire.encode(make_job()))
    del job["auth"]
    job["credential_ref"] = "core"
    await runner.run(wire.decode_job(json.dumps(job).encode()))
    auth = driver.calls[0][1]
    assert isinstance(auth, wire.SnmpAuth)
    assert auth.community is not None
    assert auth.community.get_secret_value() == "from-file"


async def test_unknown_credential_ref_is_credential_not_found(runner: Runner) -> None:
    job = json.loads(wire.encode(make_job()))
    del job["auth"]
    job["credential_ref"] = "nope"
    result = await runner.run(wire.decode_job(json.dumps(job).encode()))
    assert result.error is not None
    assert result.error.code == "credential_not_found"


async def test_kind_without_driver_is_unknown_kind(runner: Runner) -> None:
    job = make_job(kind="snmp.walk")
    result = await runner.run(job)
    assert result.error is not None
    assert result.error.code == "unknown_kind"


async def test_a_bug_propagates_for_the_worker_to_requeue(runner: Runner) -> None:
    with pytest.raises(RuntimeError, match="driver bug"):
        await runner.run(make_job("buggy"))


async def test_data_that_is_not_json_is_a_bug_not_a_result(runner: Runner) -> None:
    """The result's check of `data` is cheaper on the usual shape, and still a check."""
    with pytest.raises(ValidationError, match="input was not a valid JSON value"):
        await runner.run(make_job("not-json"))


async def test_the_runner_tells_drivers_it_guards_the_deadline(runner: Runner) -> None:
    """Drivers leave out timers of their own for the deadline when it is guarded."""
    assert (await runner.run(make_job("unguarded"))).status == "ok"


async def test_per_device_limit_holds_and_other_devices_proceed(
    runner: Runner, driver: MemoryDriver
) -> None:
    driver.delay = 0.05
    jobs = [make_job("a") for _ in range(8)] + [make_job("b") for _ in range(2)]
    results = await asyncio.gather(*(runner.run(j) for j in jobs))
    assert all(r.status == "ok" for r in results)
    assert driver.peak == {"a": 2, "b": 2}


async def test_waiting_for_a_device_slot_counts_against_the_deadline(
    runner: Runner, driver: MemoryDriver
) -> None:
    driver.delay = 1.0
    jobs = [make_job("c", timeout=0.3) for _ in range(3)]
    results = await asyncio.gather(*(runner.run(j) for j in jobs))
    assert [r.error.code if r.error else "ok" for r in results] == ["device_timeout"] * 3


async def test_jobs_of_silent_devices_leave_run_slots_to_devices_that_answer(
    driver: MemoryDriver,
) -> None:
    runner = Runner(
        drivers={"snmp.get": driver},
        credentials=CredentialStore({}),
        satellite_id="7",
        worker="w1",
        concurrency=4,
    )
    assert (await runner.run(make_job("healthy"))).status == "ok"  # it answered: trusted
    dead = [asyncio.ensure_future(runner.run(make_job(f"sleepy-{n}"))) for n in range(10)]
    await asyncio.sleep(0.01)
    assert runner.admission.running == 2  # half the slots, however many dead jobs wait
    results = await asyncio.wait_for(
        asyncio.gather(*(runner.run(make_job("healthy")) for _ in range(20))), timeout=2
    )
    assert all(r.status == "ok" for r in results)
    assert not any(task.done() for task in dead)
    # Shutting down: the jobs that never started are refused, the running ones carry on.
    assert runner.close() == 8
    outcomes = await asyncio.gather(*dead[2:], return_exceptions=True)
    assert all(isinstance(o, NotStarted) for o in outcomes)
    assert not dead[0].done()
    for task in dead[:2]:
        task.cancel()
    await asyncio.gather(*dead[:2], return_exceptions=True)
    with pytest.raises(NotStarted):
        await runner.run(make_job("healthy"))


async def test_a_job_that_never_got_a_slot_says_so(runner: Runner, driver: MemoryDriver) -> None:
    driver.delay = 1.0
    first = asyncio.ensure_future(runner.run(make_job("d")))
    second = asyncio.ensure_future(runner.run(make_job("d")))
    await asyncio.sleep(0.01)
    late = await runner.run(make_job("d", timeout=0.1))
    assert late.error is not None
    assert late.error.code == "device_timeout"
    assert "not started within 0.1 s" in late.error.message
    assert runner.quarantine.entries() == []
    assert [r.status for r in await asyncio.gather(first, second)] == ["ok", "ok"]


async def test_jobs_that_never_got_a_slot_are_answered_one_per_loop_iteration(
    runner: Runner, driver: MemoryDriver
) -> None:
    """Jobs delivered together expire together: their answers go through the low-priority
    lane, not all in the loop iteration where their deadline comes."""
    driver.delay = 1.0
    busy = [asyncio.ensure_future(runner.run(make_job("d"))) for _ in range(2)]
    await asyncio.sleep(0.01)
    late = [
        asyncio.ensure_future(runner.run(make_job("d", id=f"late-{n}", timeout=0.05)))
        for n in range(10)
    ]
    await asyncio.wait(late, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    answered = [sum(t.done() for t in late)]
    for _ in range(100):
        if answered[-1] == len(late):
            break
        await asyncio.sleep(0)  # one loop iteration
        answered.append(sum(t.done() for t in late))
    assert answered[-1] == len(late)
    steps = [b - a for a, b in itertools.pairwise(answered)]
    # A few by the time `asyncio.wait` has resumed us; then one or two per iteration.
    assert answered[0] <= 4, answered
    assert max(steps) <= 2, answered
    for task in late:
        error = task.result().error
        assert error is not None
        assert error.code == "device_timeout"
        assert "not started within 0.05 s" in error.message
    assert [r.status for r in await asyncio.gather(*busy)] == ["ok", "ok"]


# ------------------------------------------------------------------ dead-device quarantine


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def breaker_runner(
    driver: MemoryDriver | SwitchDriver,
    clock: FakeClock,
    *,
    per_device: int = 2,
    concurrency: int = 64,
    after: int = 2,
) -> Runner:
    return Runner(
        drivers={"snmp.get": driver},
        credentials=CredentialStore({}),
        satellite_id="7",
        worker="w1",
        concurrency=concurrency,
        per_device_concurrency=per_device,
        quarantine=Quarantine(after=after, cooldown=30, max_cooldown=300, clock=clock),
    )


async def test_a_dead_device_is_quarantined_and_answered_at_once(driver: MemoryDriver) -> None:
    clock = FakeClock()
    runner = breaker_runner(driver, clock)
    for _ in range(2):
        result = await runner.run(make_job("sleepy", timeout=0.05))
        assert result.error is not None
        assert result.error.code == "device_timeout"
    calls = len(driver.calls)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    refused = await runner.run(make_job("sleepy", timeout=5))
    assert loop.time() - t0 < 0.05
    assert len(driver.calls) == calls  # the driver was not even asked
    assert refused.error is not None
    assert (refused.error.code, refused.error.retryable) == ("device_unreachable", True)
    assert "quarantined until" in refused.error.message
    assert (await runner.run(make_job("healthy"))).status == "ok"
    (entry,) = runner.quarantine.entries()
    assert entry.device == "sleepy"
    assert "within 0.05 s" in entry.last_error


async def test_jobs_queued_for_a_dead_device_are_answered_when_it_is_quarantined(
    driver: MemoryDriver,
) -> None:
    runner = breaker_runner(driver, FakeClock(), per_device=2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = [runner.run(make_job("sleepy", timeout=0.2)) for _ in range(2)]
    queued = [runner.run(make_job("sleepy", timeout=10)) for _ in range(4)]
    results = await asyncio.gather(*first, *queued)
    assert loop.time() - t0 < 1.0  # not the 10 s deadline of the queued jobs
    codes = [r.error.code if r.error else "ok" for r in results]
    assert codes == ["device_timeout"] * 2 + ["device_unreachable"] * 4
    assert len(driver.calls) == 2


async def test_quarantine_answers_the_waiting_jobs_without_waiting_for_a_slot(
    driver: MemoryDriver,
) -> None:
    # concurrency 2: one slot for untrusted devices
    runner = breaker_runner(driver, FakeClock(), concurrency=2, after=1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = asyncio.ensure_future(runner.run(make_job("sleepy-a", timeout=0.2)))
    await asyncio.sleep(0.01)
    other = asyncio.ensure_future(runner.run(make_job("sleepy-b", timeout=10)))
    queued = [asyncio.ensure_future(runner.run(make_job("sleepy-a", timeout=10))) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert runner.admission.waiting == 4
    assert (await first).error is not None
    # sleepy-a is quarantined: its 3 jobs are answered now, though sleepy-b (queued ahead of
    # them) took the freed slot and holds it for 10 s.
    results = await asyncio.wait_for(asyncio.gather(*queued), timeout=1)
    assert loop.time() - t0 < 1
    assert {r.error.code for r in results if r.error} == {"device_unreachable"}
    assert all("quarantined until" in r.error.message for r in results if r.error)
    assert (runner.admission.running, runner.admission.waiting) == (1, 0)
    assert [host for host, _ in driver.calls] == ["sleepy-a", "sleepy-b"]
    other.cancel()
    await asyncio.gather(other, return_exceptions=True)


async def test_timing_out_while_queued_behind_a_slow_device_does_not_quarantine_it(
    driver: MemoryDriver,
) -> None:
    runner = breaker_runner(driver, FakeClock(), per_device=1)
    driver.delay = 0.3
    slow = asyncio.ensure_future(runner.run(make_job("busy", timeout=5)))
    await asyncio.sleep(0.01)
    queued = await asyncio.gather(*(runner.run(make_job("busy", timeout=0.05)) for _ in range(3)))
    assert {r.error.code for r in queued if r.error} == {"device_timeout"}
    assert (await slow).status == "ok"
    assert runner.quarantine.entries() == []


async def test_jobs_that_got_their_slot_just_before_the_deadline_do_not_quarantine(
    driver: MemoryDriver,
) -> None:
    # A live device, slow under a burst: the jobs behind its per-device limit start late and
    # time out after a fraction of their deadline. Two in a row would quarantine it (after=2).
    runner = breaker_runner(driver, FakeClock(), per_device=2, after=2)
    driver.delay = 0.3
    results = await asyncio.gather(*(runner.run(make_job("busy", timeout=0.5)) for _ in range(4)))
    assert [r.status for r in results] == ["ok", "ok", "error", "error"]
    late = [r.error for r in results[2:] if r.error]
    assert [e.code for e in late] == ["device_timeout"] * 2
    assert all("s left of 0.5 s (the rest went waiting for a slot)" in e.message for e in late)
    assert runner.quarantine.entries() == []
    assert runner.quarantine.trusted("busy")
    # The same silence with the whole deadline to answer in counts.
    driver.delay = 1.0
    await asyncio.gather(*(runner.run(make_job("busy", timeout=0.2)) for _ in range(2)))
    (entry,) = runner.quarantine.entries()
    assert entry.device == "busy"
    assert "within 0.2 s" in entry.last_error


class SwitchDriver:
    """A device that is dead (silent) until `dead` is set to False."""

    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.SNMP_GET})

    def __init__(self) -> None:
        self.dead = True
        self.calls = 0

    async def run(self, job: JobRequest, auth: Auth | None, ctx: JobContext) -> Data:
        self.calls += 1
        if self.dead:
            await asyncio.sleep(3600)
        return {"varbinds": []}

    async def aclose(self) -> None:
        pass


async def test_one_probe_after_the_cool_down_releases_a_recovered_device() -> None:
    clock = FakeClock()
    device = SwitchDriver()
    runner = breaker_runner(device, clock)
    for _ in range(2):
        await runner.run(make_job("flappy", timeout=0.05))
    assert (await runner.run(make_job("flappy"))).error is not None
    assert device.calls == 2
    clock.now += 30
    # The probe still times out: the cool-down doubles.
    probe = await runner.run(make_job("flappy", timeout=0.05))
    assert probe.error is not None
    assert probe.error.code == "device_timeout"
    assert device.calls == 3
    (entry,) = runner.quarantine.entries()
    assert (entry.until - entry.since).total_seconds() == 30 + 60
    clock.now += 60
    device.dead = False
    assert (await runner.run(make_job("flappy"))).status == "ok"
    assert runner.quarantine.entries() == []
    assert (await runner.run(make_job("flappy"))).status == "ok"


# ------------------------------------------------------------------ the interactive lane


async def test_a_quarantined_device_answers_an_interactive_job_ahead_of_the_bulk_answers(
    driver: MemoryDriver,
) -> None:
    clock = FakeClock()
    runner = breaker_runner(driver, clock)
    for _ in range(2):
        await runner.run(make_job("sleepy", timeout=0.05))
    assert runner.quarantine.entries()
    # A batch of bulk jobs for it: answered through the low-priority lane, one per iteration.
    bulk = [
        asyncio.ensure_future(runner.run(make_job("sleepy", id=f"bulk-{n}"))) for n in range(30)
    ]
    lane = asyncio.ensure_future(runner.run(make_job("sleepy", id="lane"), interactive=True))
    await asyncio.wait([lane], timeout=5)
    refused = lane.result()
    assert refused.error is not None
    assert refused.error.code == "device_unreachable"
    assert sum(t.done() for t in bulk) < 10  # the interactive job did not wait its turn
    results = await asyncio.gather(*bulk)
    assert {r.error.code for r in results if r.error} == {"device_unreachable"}


async def test_interactive_jobs_run_in_the_slots_kept_for_them(driver: MemoryDriver) -> None:
    runner = Runner(
        drivers={"snmp.get": driver},
        credentials=CredentialStore({}),
        satellite_id="7",
        worker="w1",
        concurrency=4,
        per_device_concurrency=4,
        interactive_slots=1,
    )
    for n in range(6):  # every device has answered once: trusted
        assert (await runner.run(make_job(f"d{n}", id=f"warm-{n}"))).status == "ok"
    driver.delay = 0.5
    bulk = [asyncio.ensure_future(runner.run(make_job(f"d{n}", id=f"b{n}"))) for n in range(6)]
    await asyncio.sleep(0.05)
    assert runner.admission.running == 3  # one slot stays free for the lane
    lane = asyncio.ensure_future(runner.run(make_job("10.0.0.9", id="lane"), interactive=True))
    await asyncio.sleep(0.05)
    assert runner.admission.running == 4
    assert (await asyncio.wait_for(lane, timeout=5)).status == "ok"
    assert sum(t.done() for t in bulk) <= 3  # it did not wait for the bulk jobs ahead of it
    assert all(r.status == "ok" for r in await asyncio.gather(*bulk))


async def test_bulk_jobs_contact_no_device_while_the_lane_goes_first(
    driver: MemoryDriver,
) -> None:
    lane_first = LaneFirst(max_pause=30)
    runner = Runner(
        drivers={"snmp.get": driver},
        credentials=CredentialStore({}),
        satellite_id="7",
        worker="w1",
        concurrency=8,
        interactive_slots=2,
        lane_first=lane_first,
    )
    release = lane_first.hold()  # an interactive job was delivered
    bulk = [asyncio.ensure_future(runner.run(make_job(f"d{n}", id=f"b{n}"))) for n in range(3)]
    lane = asyncio.ensure_future(runner.run(make_job("10.0.0.9", id="lane"), interactive=True))
    assert (await asyncio.wait_for(lane, timeout=5)).status == "ok"
    assert [host for host, _ in driver.calls] == ["10.0.0.9"]  # the bulk jobs waited
    assert not any(t.done() for t in bulk)
    release()  # it was answered: the bulk jobs go on
    assert all(r.status == "ok" for r in await asyncio.wait_for(asyncio.gather(*bulk), 5))
    assert len(driver.calls) == 4
