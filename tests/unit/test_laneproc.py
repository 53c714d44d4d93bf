"""The lane process's mirror of its replica's quarantine, and the messages between them."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
from datetime import UTC, datetime

import pytest

from poller.config import PollerSettings
from poller.errors import DeviceQuarantinedError
from poller.laneproc import (
    LaneLink,
    LaneProcess,
    _entry_message,
    _line,
    _seconds,
    lane_worker_name,
)
from poller.quarantine import MirroredQuarantine, Outcome, Quarantine, Ticket
from poller.wire import QuarantineEntry
from tests.unit.test_quarantine import T0, Clock


def test_a_device_the_replica_quarantined_is_refused_until_its_cool_down_ends() -> None:
    clock = Clock()
    mirror = MirroredQuarantine(after=3, cooldown=30, max_cooldown=100, clock=clock)
    entry = QuarantineEntry(
        device="10.0.0.1",
        since=datetime.fromtimestamp(T0 - 5, UTC),
        until=datetime.fromtimestamp(T0 + 30, UTC),
        last_error="no answer",
    )
    mirror.mirror(json.loads(_entry_message("10.0.0.1", entry, timeouts=3)))
    with pytest.raises(DeviceQuarantinedError, match=r"quarantined until .* after 3 consecutive"):
        mirror.admit("10.0.0.1")
    assert mirror.refusal("10.0.0.1") is not None
    assert mirror.refusal("10.0.0.2") is None
    assert mirror.admit("10.0.0.2") == Ticket("10.0.0.2")
    clock.now = T0 + 31  # the replica's cool-down is over: its probe (or ours) will tell
    assert mirror.admit("10.0.0.1") == Ticket("10.0.0.1")
    clock.now = T0 + 1
    mirror.mirror(json.loads(_entry_message("10.0.0.1", None)))  # released by the replica
    assert mirror.refusal("10.0.0.1") is None


def test_the_lane_process_keeps_its_own_count_too() -> None:
    mirror = MirroredQuarantine(after=2, cooldown=30, max_cooldown=100, clock=Clock())
    for _ in range(2):
        mirror.settle(mirror.admit("10.0.0.3"), Outcome.TIMEOUT, "silent")
    with pytest.raises(DeviceQuarantinedError):
        mirror.admit("10.0.0.3")


def test_entries_carry_what_the_mirror_needs() -> None:
    replica = Quarantine(after=1, cooldown=30, max_cooldown=100, clock=Clock())
    replica.settle(replica.admit("10.0.0.4"), Outcome.TIMEOUT, "silent")
    [entry] = replica.entries()
    message = json.loads(_entry_message(entry.device, entry, replica.timeouts("10.0.0.4")))
    assert message == {
        "device": "10.0.0.4",
        "until": T0 + 30,
        "since": T0,
        "timeouts": 1,
        "last_error": "silent",
    }
    assert replica.timeouts("10.0.0.5") == 0


def test_durations_from_the_socket_are_numbers_or_infinite() -> None:
    assert _seconds(None) == math.inf
    assert _seconds(1.5) == 1.5
    assert _seconds(2) == 2.0
    for bad in ("1", True, [1]):
        with pytest.raises(TypeError):
            _seconds(bad)


def test_the_lane_worker_name_stays_a_valid_worker_name() -> None:
    assert lane_worker_name("poller-a-0") == "poller-a-0-lane"
    assert len(lane_worker_name("x" * 64)) == 64


async def test_the_lane_process_says_when_it_has_started() -> None:
    # The replica then looks at the memory of both (max_rss_below_start, poller/recycle.py).
    mine, theirs = socket.socketpair()
    link = LaneLink(theirs.detach())
    try:
        await link.start(on_gone=lambda: None)
        reader, writer = await asyncio.open_connection(sock=mine)
        async with asyncio.timeout(5):
            line = await reader.readline()
        assert json.loads(line) == {"started": os.getpid()}
        writer.close()
    finally:
        await link.close()


async def test_the_replica_hears_the_start_and_the_outcomes() -> None:
    started: list[int] = []
    outcomes: list[tuple[str, Outcome]] = []
    lane = LaneProcess(
        PollerSettings(amqp_dsn="amqp://127.0.0.1/", satellite_id="t"),
        worker_name="w",
        quarantine=Quarantine(after=3, cooldown=30, max_cooldown=100, clock=Clock()),
        on_outcome=lambda device, outcome, *_: outcomes.append((device, outcome)),
        on_started=lambda: started.append(1),
    )
    reader = asyncio.StreamReader()
    reader.feed_data(_line({"started": 123}))
    reader.feed_data(_line({"device": "10.0.0.6", "outcome": "TIMEOUT", "silent_for": 2.0}))
    reader.feed_data(_line({"started": 124}))  # a restarted lane process
    reader.feed_eof()
    async with asyncio.timeout(5):
        await lane._listen(reader)
    assert started == [1, 1]
    assert outcomes == [("10.0.0.6", Outcome.TIMEOUT)]
