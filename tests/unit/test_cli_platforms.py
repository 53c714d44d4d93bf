"""platforms.yaml: it loads, validates, and its patterns fit each vendor's prompts and pagers."""

from __future__ import annotations

import re

import pytest
from scrapli.exceptions import ScrapliAuthenticationFailed, ScrapliConnectionError, ScrapliTimeout

from poller.drivers.cli import map_cli_error
from poller.drivers.platforms import load_platforms, parse_platforms
from tests.support.fake_devices import PROFILES

REQUIRED = {
    "generic",
    "cisco_ios",
    "huawei_vrp",
    "dlink",
    "eltex",
    "zte",
    "mikrotik_routeros",
    "juniper_junos",
}


def test_every_required_platform_is_defined() -> None:
    assert set(load_platforms()) >= REQUIRED


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_prompt_and_pager_patterns_fit_the_vendor(name: str) -> None:
    platform = load_platforms()[name]
    profile = PROFILES[name]
    prompt = platform.regex(platform.prompt)
    assert prompt.search(profile.prompt)
    if profile.privileged_prompt:
        assert prompt.search(profile.privileged_prompt)
    assert any(p.regex.search(profile.pager) for p in platform.pagers)
    assert not prompt.search(profile.username_prompt)
    assert not prompt.search(profile.password_prompt)
    assert platform.regex(platform.username_prompt).search(profile.username_prompt)
    assert platform.regex(platform.password_prompt).search(profile.password_prompt)
    errors = platform.any_of(platform.error_markers)
    assert errors is not None
    assert errors.search(profile.invalid.format(command="nonsense").replace("\r", ""))
    if platform.privileged_prompt and profile.privileged_prompt:
        assert platform.regex(platform.privileged_prompt).search(profile.privileged_prompt)
        assert not platform.regex(platform.privileged_prompt).search(profile.prompt)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_ordinary_output_does_not_look_like_an_error_or_pager(name: str) -> None:
    platform = load_platforms()[name]
    errors = platform.any_of(platform.error_markers)
    assert errors is not None
    text = "Interface GigabitEthernet0/1 is up\n  5 minute input rate 0 bits/sec\nerrors: 0 CRC"
    assert not errors.search(text)
    assert not any(p.regex.search("  description more-uplinks") for p in platform.pagers)


def test_invalid_regex_is_refused_with_the_platform_name() -> None:
    text = "defaults: {username_prompt: 'u:', password_prompt: 'p:', login_failed: []}\n"
    text += "platforms:\n  broken:\n    prompt: '[unclosed'\n"
    with pytest.raises(ValueError, match="broken"):
        parse_platforms(text)


def test_unknown_keys_are_refused() -> None:
    text = "platforms:\n  x:\n    prompt: 'a#'\n    colour: red\n"
    with pytest.raises(ValueError, match="x"):
        parse_platforms(text)


def _chained(outer: Exception, cause: BaseException) -> Exception:
    """`outer` raised from `cause`, as scrapli raises its errors."""
    outer.__cause__ = cause
    return outer


def test_a_connect_timeout_reported_as_auth_failure_by_scrapli_is_a_timeout() -> None:
    exc = _chained(ScrapliAuthenticationFailed("timed out opening"), TimeoutError())
    assert map_cli_error(exc, "h:22").code == "device_timeout"


def test_errors_are_mapped_by_their_cause() -> None:
    refused = _chained(ScrapliConnectionError("x"), ConnectionRefusedError(111, "refused"))
    assert map_cli_error(refused, "h:23").code == "device_unreachable"
    assert map_cli_error(ScrapliAuthenticationFailed("denied"), "h").code == "auth_failed"
    assert map_cli_error(ScrapliTimeout("slow"), "h").code == "device_timeout"


def test_patterns_are_case_insensitive() -> None:
    platform = load_platforms()["cisco_ios"]
    errors = platform.any_of(platform.error_markers)
    assert errors is not None
    assert errors.search("% INVALID INPUT detected")
    assert re.search(platform.pagers[0].pattern, "--MORE--", re.IGNORECASE)
