"""The alerts file's validation (one line per problem, naming the variable) and the rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from poller.errors import ConfigError
from satellite.service.alerts import (
    DEFAULT_RULES,
    Facts,
    Growth,
    evaluate_row,
    load_alerts_file,
    parse_alerts,
)


def facts(**kw: object) -> Facts:
    values: dict[str, object] = {
        "satellite_id": "s1",
        "replicas": 1,
        "consumers": 1,
        "oldest_age_s": None,
        "ready": 0,
        "dead_letters": 0,
        "overdue": 0,
        "versions": ("1.0",),
        "skew": False,
        "quarantined": 0,
    }
    values.update(kw)
    return Facts(**values)  # type: ignore[arg-type]


def firing(found: Facts, **kw: object) -> set[str]:
    rules = dict(DEFAULT_RULES)
    return {f.rule for f in evaluate_row(found, rules, **kw) if f.firing}  # type: ignore[arg-type]


def test_without_a_file_the_default_rules_apply_and_there_is_no_channel() -> None:
    config = load_alerts_file(None)
    assert config.channels == ()
    assert config.rules["satellite_down"].after == 60
    assert config.rules["quarantine"].enabled is False


def test_a_healthy_satellite_fires_nothing() -> None:
    assert firing(facts()) == set()


@pytest.mark.parametrize(
    ("kw", "rule"),
    [
        ({"consumers": 0}, "satellite_down"),
        ({"replicas": 0}, "satellite_down"),
        ({"oldest_age_s": 301.0}, "backlog"),
        ({"dead_letters": 1}, "dlq"),
        ({"overdue": 2}, "overdue"),
        ({"skew": True, "versions": ("0.9", "1.0")}, "version_skew"),
    ],
)
def test_each_rule_fires_on_its_condition(kw: dict[str, object], rule: str) -> None:
    assert firing(facts(**kw)) == {rule}


def test_satellite_down_holds_for_after_seconds_before_it_fires() -> None:
    # The verdict of one look carries its hold: the store fires it once consecutive
    # evaluations have seen it for `after` seconds (test_alerts_store.py).
    down = [f for f in evaluate_row(facts(consumers=0), dict(DEFAULT_RULES)) if f.firing]
    assert [(f.rule, f.hold) for f in down] == [("satellite_down", 60.0)]
    others = evaluate_row(facts(dead_letters=1), dict(DEFAULT_RULES))
    assert all(f.hold == 0 for f in others if f.rule != "satellite_down")


def test_a_queue_growing_for_five_minutes_is_a_backlog() -> None:
    growth = Growth()
    assert growth.sample("s1", 1, 0.0) is None
    since = None
    for n in range(2, 12):
        since = growth.sample("s1", n, 30.0 * (n - 1))
    assert since == 0.0
    assert firing(facts(ready=11), growing_since=since, now_mono=300.0) == {"backlog"}
    assert firing(facts(ready=11), growing_since=since, now_mono=299.0) == set()
    assert growth.sample("s1", 5, 330.0) is None  # it shrank: growth starts again


def test_quarantine_is_off_by_default_and_counts_above_n(tmp_path: Path) -> None:
    assert firing(facts(quarantined=9)) == set()
    config, errors = parse_alerts({"rules": {"quarantine": {"enabled": True, "above": 2}}})
    assert errors == []
    over = evaluate_row(facts(quarantined=3), config.rules)
    assert {f.rule for f in over if f.firing} == {"quarantine"}
    under = evaluate_row(facts(quarantined=2), config.rules)
    assert {f.rule for f in under if f.firing} == set()


def test_a_valid_file_with_both_channel_types(tmp_path: Path) -> None:
    (tmp_path / "bot").write_text("123:abc\n")
    (tmp_path / "hmac").write_text("key\n")
    path = tmp_path / "alerts.yaml"
    path.write_text(
        "channels:\n"
        "  - {name: ops, type: webhook, url: 'https://hooks.example/a', secret_file: hmac}\n"
        "  - {name: phone, type: telegram, bot_token_file: bot, chat_id: -100123}\n"
        "rules:\n"
        "  backlog: {age: 600}\n"
        "  satellite_down: {channels: [phone], after: 90}\n"
        "  dlq: {enabled: false}\n"
    )
    config = load_alerts_file(path)
    assert [c.name for c in config.channels] == ["ops", "phone"]
    assert config.channels[1].chat_id == "-100123"
    assert config.channels[1].bot_token() == "123:abc"
    assert config.channels[0].secret() == b"key"
    assert config.rules["backlog"].age == 600
    assert [c.name for c in config.channels_for("satellite_down")] == ["phone"]
    assert [c.name for c in config.channels_for("overdue")] == ["ops", "phone"]
    assert config.rules["dlq"].enabled is False
    assert "123:abc" not in repr(config)


def test_every_problem_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "alerts.yaml"
    path.write_text(
        "channels:\n"
        "  - {name: ops, type: webhook}\n"
        "  - {name: ops, type: sms, url: 'ftp://x'}\n"
        "  - {name: tg, type: telegram, bot_token_file: missing-file}\n"
        "rules:\n"
        "  nope: {}\n"
        "  backlog: {age: -1, colour: red}\n"
        "  dlq: {channels: [pager]}\n"
        "extra: 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_alerts_file(path)
    lines = str(caught.value).splitlines()
    assert all(line.startswith(f"USM_CORE_ALERTS_FILE ({path}): ") for line in lines)
    found = [line.split("): ", 1)[1] for line in lines]
    assert found == [
        "extra: unknown key (channels, rules)",
        "channels[0].url: a webhook needs a url",
        "channels[1].name: 'ops' is used twice",
        "channels[1].url: must be an http:// or https:// URL",
        "channels[1].type: must be webhook or telegram",
        f"channels[2].bot_token_file: {tmp_path / 'missing-file'} is not a readable file",
        "channels[2].chat_id: a telegram channel needs one",
        "rules.nope: unknown rule (satellite_down, backlog, dlq, overdue, version_skew, "
        "quarantine)",
        "rules.backlog.colour: unknown key (above, after, age, channels, enabled, growing_for)",
        "rules.backlog.age: must be a number >= 0",
        "rules.dlq.channels: no channel named 'pager'",
    ]


def test_a_file_that_is_not_yaml_or_missing_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "alerts.yaml"
    bad.write_text("channels: [\n")
    with pytest.raises(ConfigError, match=r"^USM_CORE_ALERTS_FILE \(.*\): not YAML at line \d+$"):
        load_alerts_file(bad)
    with pytest.raises(ConfigError, match=r"cannot be read"):
        load_alerts_file(tmp_path / "absent.yaml")
