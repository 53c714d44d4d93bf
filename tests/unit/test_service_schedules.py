"""The schedules file: one line per problem, slots aligned to the epoch or cron, stable spread."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from poller import wire
from satellite.service.scheduler import ScheduleFile
from satellite.service.schedules import ScheduleFileError, Target, load_schedules

GOOD = """
schedules:
  - name: ping-all
    satellite: pop-a
    every: 60
    kind: icmp.ping
    targets: [{host: 192.0.2.1}, {host: 192.0.2.2}, "192.0.2.3"]
  - name: iftable
    satellite: pop-a
    cron: "*/5 * * * *"
    tz: Europe/Paris
    kind: snmp.walk
    params: {oids: [1.3.6.1.2.1.2.2]}
    auth: {version: "2c", community: sekrit-community}
    timeout: 20
    targets_file: switches.csv
    overlap: queue
    catch_up: latest
    spread: false
"""


def write(tmp_path: Path, text: str, csv: str = "host,port\n192.0.2.10\n192.0.2.11,1161\n") -> Path:
    (tmp_path / "switches.csv").write_text(csv)
    path = tmp_path / "schedules.yaml"
    path.write_text(text)
    return path


def test_a_good_file_loads_with_its_defaults(tmp_path: Path) -> None:
    loaded = load_schedules(write(tmp_path, GOOD))
    ping, walk = loaded.schedules["ping-all"], loaded.schedules["iftable"]
    assert ping.every == 60
    assert ping.spread
    assert ping.overlap == "skip"
    assert ping.catch_up == "skip"
    assert ping.enabled
    assert ping.timeout == 30.0
    assert {t.key for t in ping.targets} == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
    assert walk.cron == "*/5 * * * *"
    assert walk.tz == "Europe/Paris"
    assert [t.key for t in walk.targets] == ["192.0.2.10", "192.0.2.11:1161"]
    assert all(t.frac == 0.0 for t in walk.targets)
    assert walk.source == "schedule:iftable"


def test_every_problem_is_one_line_naming_file_schedule_and_field(tmp_path: Path) -> None:
    bad = """
schedules:
  - name: a
    satellite: pop-a
    every: 0
    kind: icmp.ping
    targets: [{host: 192.0.2.1}]
    overlap: never
  - name: b
    satellite: pop-a
    cron: "61 * * * *"
    kind: snmp.walk
    params: {oids: [1.3.6.1.2.1.2.2]}
    auth: {version: "2c", community: sekrit-community}
    targets_file: missing.csv
  - name: c
    satellite: pop-a
    every: 10
    kind: snmp.walk
    auth: {version: "2c", community: sekrit-community}
    targets: [{host: 192.0.2.1}]
    colour: blue
"""
    with pytest.raises(ScheduleFileError) as caught:
        load_schedules(write(tmp_path, bad))
    lines = caught.value.lines
    path = tmp_path / "schedules.yaml"
    assert f"{path}: schedule a: every: must be a whole number of seconds, 1 to 604800" in lines
    assert f"{path}: schedule a: overlap: must be skip or queue" in lines
    assert any(line.startswith(f"{path}: schedule b: cron: ") for line in lines)
    assert any(
        line.startswith(f"{path}: schedule b: targets_file: ") and "missing.csv" in line
        for line in lines
    )
    assert f"{path}: schedule c: colour: is not a schedule field" in lines
    assert all("sekrit" not in line for line in lines)


def test_a_job_the_wire_refuses_is_refused_at_load(tmp_path: Path) -> None:
    bad = """
schedules:
  - name: walk
    satellite: pop-a
    every: 10
    kind: snmp.walk
    auth: {version: "2c", community: sekrit-community}
    targets: [{host: 192.0.2.1}]
"""
    with pytest.raises(ScheduleFileError) as caught:
        load_schedules(write(tmp_path, bad))
    (line,) = caught.value.lines
    assert line.startswith(f"{tmp_path / 'schedules.yaml'}: schedule walk: kind/params/auth: ")
    assert "sekrit" not in line


def test_duplicates_and_bad_csv_lines_are_named(tmp_path: Path) -> None:
    text = GOOD + GOOD.split("schedules:")[1].split("  - name: iftable", maxsplit=1)[0]
    with pytest.raises(ScheduleFileError) as caught:
        load_schedules(write(tmp_path, text, csv="192.0.2.10\n192.0.2.10\nx,1,2\n"))
    lines = caught.value.lines
    assert any("schedule ping-all: name: appears twice" in line for line in lines)
    assert any("line 2" in line and "appears twice" in line for line in lines)
    assert any("line 3: must be host[,port]" in line for line in lines)


def test_invalid_yaml_and_a_missing_file_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ScheduleFileError) as caught:
        load_schedules(write(tmp_path, "schedules: [\n"))
    assert len(caught.value.lines) == 1
    assert "not valid YAML" in caught.value.lines[0]
    with pytest.raises(ScheduleFileError) as caught:
        load_schedules(tmp_path / "nope.yaml")
    assert "cannot be read" in caught.value.lines[0]


def test_slots_are_aligned_to_the_epoch_and_job_ids_are_deterministic(tmp_path: Path) -> None:
    ping = load_schedules(write(tmp_path, GOOD)).schedules["ping-all"]
    slot = ping.slot_at(1_000_000_030.5)
    assert slot.start % 60 == 0
    assert slot.start <= 1_000_000_030.5 < slot.end
    assert ping.job_id(slot.start, Target("192.0.2.2")) == f"ping-all:{int(slot.start)}:192.0.2.2"
    assert ping.job_id(slot.start, Target("h", 1161)) == f"ping-all:{int(slot.start)}:h:1161"
    slots = list(ping.slots(slot.start - 1, slot.start + 130))
    assert [s.start - slot.start for s in slots] == [-60, 0, 60, 120]


def test_cron_slots_are_its_fire_times_in_its_zone(tmp_path: Path) -> None:
    walk = load_schedules(write(tmp_path, GOOD)).schedules["iftable"]
    t = datetime(2026, 7, 1, 10, 7, 30, tzinfo=UTC).timestamp()
    slot = walk.slot_at(t)
    assert slot.start == datetime(2026, 7, 1, 10, 5, tzinfo=UTC).timestamp()
    assert slot.length == 300
    at_fire = walk.slot_at(slot.end)
    assert at_fire.start == slot.end


def test_spread_is_stable_and_fills_the_interval(tmp_path: Path) -> None:
    hosts = "\n".join(f"10.0.{i // 250}.{i % 250}" for i in range(1000))
    text = """
schedules:
  - name: many
    satellite: pop-a
    every: 10
    kind: icmp.ping
    targets_file: switches.csv
"""
    first = load_schedules(write(tmp_path, text, csv=hosts)).schedules["many"]
    again = load_schedules(write(tmp_path, text, csv=hosts)).schedules["many"]
    assert first.targets == again.targets
    per_second = [0] * 10
    for target in first.targets:
        per_second[int(target.frac * 10)] += 1
    assert per_second == [100] * 10


def test_the_job_built_is_a_wire_job_with_not_after(tmp_path: Path) -> None:
    walk = load_schedules(write(tmp_path, GOOD)).schedules["iftable"]
    target = walk.targets[0]
    body = walk.job("iftable:1:192.0.2.10", target, 1_800_000_000.0, auth=True)
    job = wire.decode_job(json.dumps(body).encode())
    assert job.not_after == datetime.fromtimestamp(1_800_000_000, UTC)
    assert "auth" not in walk.job("x", target, 0.0, auth=False)


def test_a_file_fixed_after_a_refusal_is_said_to_be_taken_again(tmp_path: Path) -> None:
    """Bad, then the last good file back: the newest line says it is taken, not refused."""
    path = write(tmp_path, GOOD)
    watched = ScheduleFile(path)
    with capture_logs() as logs:
        assert watched.load()
        path.write_text(GOOD.replace("every: 60", "every: 0"))
        assert not watched.load()
        path.write_text(GOOD)
        watched.check()
    events = [line["event"] for line in logs if line["event"].startswith("schedules_")]
    assert events == [
        "schedules_loaded",
        "schedules_refused",
        "schedules_file_refused",
        "schedules_loaded",
    ]
    assert watched.problems == []
