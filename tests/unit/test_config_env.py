"""Unknown `USM_POLLER_*` variables: a warning with the nearest name, never a failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from poller.config import (
    PollerSettings,
    env_name,
    known_variables,
    load_settings,
    unknown_variables,
)
from poller.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DSN = "amqp://sat7:pa55-w0rd-xyz@broker.example:5672/%2Fisp"
#: Misspellings the docs and tests show on purpose.
DELIBERATE_TYPOS = {"USM_POLLER_CONCURENCY"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(("USM_POLLER_", "US_AMQP")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("US_AMQP_DSN", DSN)
    monkeypatch.setenv("USM_POLLER_SATELLITE_ID", "7")


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("USM_POLLER_CONCURENCY", "USM_POLLER_CONCURRENCY"),
        ("USM_POLLER_SATELITE_ID", "USM_POLLER_SATELLITE_ID"),
        ("USM_POLLER_HEALTHFILE", "USM_POLLER_HEALTH_FILE"),
        ("usm_poller_heartbeat_intervall", "USM_POLLER_HEARTBEAT_INTERVAL"),
        ("USM_POLLER_AMQP_DNS", "USM_POLLER_AMQP_DSN"),
        ("USM_POLLER_DSN", "US_AMQP_DSN"),
        ("USM_POLLER_BANANA", None),
    ],
)
def test_unknown_variable_is_named_with_the_nearest_setting(
    name: str, suggestion: str | None
) -> None:
    [unknown] = unknown_variables({name: "secret-value-1", "USM_POLLER_CONCURRENCY": "8"})
    assert (unknown.name, unknown.suggestion) == (name, suggestion)
    assert name in unknown.message()
    assert "secret-value-1" not in unknown.message()
    assert ("did you mean" in unknown.message()) is (suggestion is not None)


def test_every_setting_and_alias_is_known_in_any_case() -> None:
    env = {env_name(field): "x" for field in PollerSettings.model_fields}
    env |= {name.lower(): "x" for name in env}
    env |= {"USM_POLLER_AMQP_DSN": "x", "US_AMQP_DSN": "x", "USM_CORE_DB": "x", "PATH": "/bin"}
    assert unknown_variables(env) == []


def test_every_variable_the_project_mentions_is_read_by_it() -> None:
    """Docs, compose files, scripts and code name only variables that do not warn.

    `poller check` reads USM_POLLER_HEALTH_FILE and USM_POLLER_STATE_DIR itself: both are
    settings of `poller run` as well, so they are known.
    """
    files = [ROOT / "README.md", ROOT / "Dockerfile", *ROOT.glob("compose*.yaml")]
    suffixes = (".md", ".py", ".sh", ".yaml")
    for folder in ("docs", "poller", "satellite", "scripts", "tests", "bench"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in suffixes]
    files.remove(Path(__file__).resolve())  # this file misspells them on purpose
    mentioned = set()
    for path in files:
        mentioned |= set(re.findall(r"\bUSM_POLLER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert mentioned - known_variables() - DELIBERATE_TYPOS == set()
    assert {"USM_POLLER_HEALTH_FILE", "USM_POLLER_STATE_DIR"} <= known_variables()


def test_a_missing_setting_names_the_misspelt_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USM_POLLER_SATELLITE_ID")
    monkeypatch.setenv("USM_POLLER_SATELITE_ID", "7")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        "USM_POLLER_SATELLITE_ID: is required but not set "
        "(USM_POLLER_SATELITE_ID is set: a misspelling of it?)"
    )


def test_unknown_variables_do_not_change_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USM_POLLER_CONCURENCY", "8")
    assert load_settings().concurrency == 64


def _config_show(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poller", "config", "show"],
        env=dict(os.environ) | extra,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_show_warns_in_one_line_and_succeeds() -> None:
    proc = _config_show({"USM_POLLER_CONCURENCY": "8"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        "poller: warning: USM_POLLER_CONCURENCY is not a known setting and is ignored; "
        "did you mean USM_POLLER_CONCURRENCY?\n"
    )
    assert re.search(r"^USM_POLLER_CONCURRENCY +64$", proc.stdout, re.MULTILINE)


def test_a_failed_load_still_prints_one_line() -> None:
    proc = _config_show({"USM_POLLER_CONCURENCY": "8", "USM_POLLER_CONCURRENCY": "lots"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("poller: USM_POLLER_CONCURRENCY:")
