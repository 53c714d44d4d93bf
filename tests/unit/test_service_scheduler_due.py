"""What one claim takes of a schedule's due times: late ones after downtime (catch_up), spread."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from satellite.service.scheduler import Scheduler, late_grace
from satellite.service.schedules import Schedule, load_schedules

T = 1_800_000_000.0  # a multiple of 60 and of 10


def schedule(tmp_path: Path, catch_up: str, every: int = 60, spread: bool = True) -> Schedule:
    path = tmp_path / "s.yaml"
    hosts = ", ".join(f'{{host: "192.0.2.{n + 1}"}}' for n in range(6))
    path.write_text(
        "schedules:\n"
        "  - name: s\n"
        "    satellite: pop-a\n"
        f"    every: {every}\n"
        "    kind: icmp.ping\n"
        f"    catch_up: {catch_up}\n"
        f"    spread: {'true' if spread else 'false'}\n"
        f"    targets: [{hosts}]\n"
    )
    return load_schedules(path).schedules["s"]


def due(s: Schedule, after: float, now: float) -> tuple[list[str], dict[str, int]]:
    items, skipped, _ = Scheduler.due(s, after, now)
    return sorted(s.job_id(slot, target) for _, target, slot in items), skipped


def test_a_running_service_claims_each_due_time_once_across_ticks(tmp_path: Path) -> None:
    s = schedule(tmp_path, "skip")
    ticks = [T - 0.25 + 0.25 * n for n in range(4 * 120 + 1)]
    seen: list[str] = []
    for a, b in itertools.pairwise(ticks):
        ids, skipped = due(s, a, b)
        assert not skipped
        seen += ids
    assert len(seen) == len(set(seen)) == 6 * 2
    assert {i.split(":")[1] for i in seen} == {str(int(T)), str(int(T) + 60)}


def test_catch_up_skip_counts_what_the_downtime_missed(tmp_path: Path) -> None:
    s = schedule(tmp_path, "skip", spread=False)
    # Down from T-1 to T+215: 4 slots started meanwhile, the newest 35 s ago (grace: 30 s).
    ids, skipped = due(s, T - 1, T + 215)
    assert late_grace(s, 60) == 30
    assert ids == []
    assert skipped == {"missed": 6 * 4}


def test_catch_up_latest_sends_only_the_newest_missed_slot_per_target(tmp_path: Path) -> None:
    s = schedule(tmp_path, "latest", spread=False)
    ids, skipped = due(s, T - 1, T + 215)
    assert ids == sorted(f"s:{int(T) + 180}:192.0.2.{n + 1}" for n in range(6))
    assert skipped == {"missed": 6 * 3}


def test_a_short_outage_within_the_grace_still_sends_late(tmp_path: Path) -> None:
    s = schedule(tmp_path, "skip", spread=False)
    ids, skipped = due(s, T - 1, T + 20)
    assert len(ids) == 6
    assert not skipped


def test_bisection_finds_exactly_the_due_times_a_full_scan_finds(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    hosts = ", ".join(f'{{host: "10.0.{n // 250}.{n % 250}"}}' for n in range(997))
    path.write_text(
        "schedules:\n  - name: m\n    satellite: pop-a\n    every: 7\n    kind: icmp.ping\n"
        f"    targets: [{hosts}]\n"
    )
    s = load_schedules(path).schedules["m"]
    rng = random.Random(15)
    for _ in range(300):
        after = T + rng.uniform(-20, 20)
        until = after + rng.choice([0.001, 0.25, 1.0, 6.99, 7.0, 13.5])
        for slot in s.slots(after, until):
            full = [(s.due_at(slot, t), t) for t in s.targets if after < s.due_at(slot, t) <= until]
            assert list(s.due_in(slot, after, until)) == full
