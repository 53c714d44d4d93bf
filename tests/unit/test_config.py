"""Settings: env names, defaults, one-line errors, masked secrets, the YAML file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from poller import __version__, config, recycle
from poller.config import load_settings, mask_dsn, parse_dsn
from poller.errors import ConfigError

DSN = "amqp://sat7:pa55-w0rd-xyz@broker.example:5672/%2Fisp"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("USM_POLLER_", "US_AMQP")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("US_AMQP_DSN", DSN)
    monkeypatch.setenv("USM_POLLER_SATELLITE_ID", "7")


def test_two_variables_are_enough() -> None:
    s = load_settings()
    assert s.satellite_id == "7"
    assert (s.concurrency, s.declare, s.queue_type, s.heartbeat) == (64, True, "quorum", 30)
    assert (s.heartbeat_interval, s.shutdown_grace, s.max_job_bytes) == (10.0, 30.0, 262_144)
    assert (s.max_output_bytes, s.per_device_concurrency, s.snmp_backend) == (4_194_304, 4, "auto")
    [url] = s.amqp_urls
    assert (url.host, url.port, url.vhost, url.username) == ("broker.example", 5672, "/isp", "sat7")


def test_interactive_lane_defaults_follow_the_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (s.effective_interactive_slots, s.effective_interactive_prefetch) == (8, 16)
    monkeypatch.setenv("USM_POLLER_CONCURRENCY", "4")
    s = load_settings()
    assert (s.effective_interactive_slots, s.effective_interactive_prefetch) == (1, 4)
    monkeypatch.setenv("USM_POLLER_CONCURRENCY", "1")
    assert load_settings().effective_interactive_slots == 0  # the one slot stays for bulk jobs
    monkeypatch.setenv("USM_POLLER_CONCURRENCY", "16")
    monkeypatch.setenv("USM_POLLER_INTERACTIVE_SLOTS", "0")
    monkeypatch.setenv("USM_POLLER_INTERACTIVE_PREFETCH", "2")
    s = load_settings()
    assert (s.effective_interactive_slots, s.effective_interactive_prefetch) == (0, 2)
    view = s.public_view()
    assert (view["USM_POLLER_INTERACTIVE_SLOTS"], view["USM_POLLER_INTERACTIVE_PREFETCH"]) == (0, 2)


def test_the_lane_process_is_on_by_default_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().interactive_process is True
    assert load_settings().public_view()["USM_POLLER_INTERACTIVE_PROCESS"] is True
    monkeypatch.setenv("USM_POLLER_INTERACTIVE_PROCESS", "false")
    assert load_settings().interactive_process is False
    assert load_settings().public_view()["USM_POLLER_INTERACTIVE_PROCESS"] is False


def test_alternative_dsn_name_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("US_AMQP_DSN")
    monkeypatch.setenv("USM_POLLER_AMQP_DSN", "amqp://u:p@h/")
    assert load_settings().amqp_urls[0].host == "h"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("USM_POLLER_CONCURRENCY", "lots", "USM_POLLER_CONCURRENCY: "),
        ("USM_POLLER_CONCURRENCY", "0", "USM_POLLER_CONCURRENCY: "),
        ("USM_POLLER_QUEUE_TYPE", "stream", "USM_POLLER_QUEUE_TYPE: "),
        ("USM_POLLER_SATELLITE_ID", "site 7", "USM_POLLER_SATELLITE_ID: "),
        ("USM_POLLER_DECLARE", "maybe", "USM_POLLER_DECLARE: "),
        ("USM_POLLER_INTERACTIVE_SLOTS", "64", "USM_POLLER_INTERACTIVE_SLOTS: must be below"),
        ("USM_POLLER_INTERACTIVE_SLOTS", "-1", "USM_POLLER_INTERACTIVE_SLOTS: "),
        ("USM_POLLER_INTERACTIVE_PREFETCH", "0", "USM_POLLER_INTERACTIVE_PREFETCH: "),
        ("USM_POLLER_BULK_HEADROOM_MS", "-1", "USM_POLLER_BULK_HEADROOM_MS: "),
        ("USM_POLLER_BULK_HEADROOM_MS", "5ms", "USM_POLLER_BULK_HEADROOM_MS: "),
        ("USM_POLLER_BULK_HEADROOM_MS", "1001", "USM_POLLER_BULK_HEADROOM_MS: "),
        ("USM_POLLER_MAX_RSS_MB", "-1", "USM_POLLER_MAX_RSS_MB: "),
        ("USM_POLLER_MAX_RSS_MB", "512MB", "USM_POLLER_MAX_RSS_MB: "),
        ("USM_POLLER_MAX_RSS_MB", "0.5", "USM_POLLER_MAX_RSS_MB: "),
        ("USM_POLLER_MAX_JOBS", "-5", "USM_POLLER_MAX_JOBS: "),
        ("USM_POLLER_MAX_JOBS", "1e6", "USM_POLLER_MAX_JOBS: "),
        ("US_AMQP_DSN", "http://u:secret-pw@h/", "US_AMQP_DSN: URL 1 must start with amqp"),
        ("US_AMQP_DSN", "amqps://u:secret-pw@h/?verify=none", "US_AMQP_DSN: URL 1 has the "),
        ("US_AMQP_DSN", "amqp://a/,amqp://u:secret-pw@/", "US_AMQP_DSN: URL 2 has no host"),
    ],
)
def test_bad_value_names_the_variable(
    name: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)  # restored afterwards, unlike os.environ[name] = value
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message
    assert "secret-pw" not in message


def test_missing_required_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USM_POLLER_SATELLITE_ID")
    with pytest.raises(ConfigError, match=r"^USM_POLLER_SATELLITE_ID: is required but not set$"):
        load_settings()


def test_several_urls_for_failover() -> None:
    urls = parse_dsn("amqp://a:1@n1:5672/v, amqps://a:1@n2/v?cafile=/ca.pem")
    assert [(u.host, u.port, u.tls, u.cafile) for u in urls] == [
        ("n1", 5672, False, None),
        ("n2", 5671, True, "/ca.pem"),
    ]


def test_tls_options_need_amqps() -> None:
    with pytest.raises(ValueError, match="not amqps"):
        parse_dsn("amqp://h/?cafile=/x")


def test_password_is_masked_everywhere() -> None:
    s = load_settings()
    assert "pa55-w0rd-xyz" not in repr(s)
    assert "pa55-w0rd-xyz" not in str(s.public_view())
    assert "pa55-w0rd-xyz" not in repr(s.amqp_urls)
    assert mask_dsn(DSN) == "amqp://sat7:***@broker.example:5672/%2Fisp"


def test_yaml_file_gives_values_and_env_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "poller.yaml"
    cfg.write_text(
        "USM_POLLER_CONCURRENCY: 8\nper_device_concurrency: 2\nsatellite_id: from-file\n"
    )
    monkeypatch.setenv("USM_POLLER_CONFIG_FILE", str(cfg))
    s = load_settings()
    assert (s.concurrency, s.per_device_concurrency, s.satellite_id) == (8, 2, "7")


def test_yaml_file_with_unknown_key_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "poller.yaml"
    cfg.write_text("colour: blue\n")
    monkeypatch.setenv("USM_POLLER_CONFIG_FILE", str(cfg))
    with pytest.raises(ConfigError, match="is not a known setting"):
        load_settings()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poller", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_exits_2_with_one_line_and_no_password() -> None:
    env = dict(os.environ) | {"USM_POLLER_CONCURRENCY": "many"}
    proc = run_cli("run", env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("poller: USM_POLLER_CONCURRENCY:")
    assert "pa55" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("USM_POLLER_MAX_RSS_MB", "lots"),
        ("USM_POLLER_MAX_JOBS", "-1"),
        ("USM_POLLER_BULK_HEADROOM_MS", "-3"),
    ],
)
def test_cli_exits_2_naming_a_bad_recycle_setting(name: str, value: str) -> None:
    proc = run_cli("run", env=dict(os.environ) | {name: value})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"poller: {name}:")


def test_recycling_defaults_and_explicit_values(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (s.max_rss_mb, s.max_jobs) == (None, 0)  # None: from the cgroup's memory limit
    monkeypatch.setenv("USM_POLLER_MAX_RSS_MB", "0")
    monkeypatch.setenv("USM_POLLER_MAX_JOBS", "100000")
    s = load_settings()
    assert (s.effective_max_rss_mb, s.max_jobs) == (None, 100_000)
    monkeypatch.setenv("USM_POLLER_MAX_RSS_MB", "400")
    assert load_settings().effective_max_rss_mb == 400


def test_max_rss_default_comes_from_the_cgroup_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount = tmp_path / "cgroup"
    mount.mkdir()
    (mount / "memory.max").write_text(f"{512 * 1024 * 1024}\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/\n")

    def fake_limit() -> int | None:
        return recycle.cgroup_memory_limit(mount, proc, total_memory=1 << 40)

    monkeypatch.setattr(config, "cgroup_memory_limit", fake_limit)
    s = load_settings()
    assert s.effective_max_rss_mb == 409
    assert s.public_view()["USM_POLLER_MAX_RSS_MB"] == 409
    (mount / "memory.max").write_text("max\n")
    assert s.effective_max_rss_mb is None
    assert s.public_view()["USM_POLLER_MAX_RSS_MB"] == 0


def test_config_show_masks_the_password() -> None:
    proc = run_cli("config", "show", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "US_AMQP_DSN" in proc.stdout
    assert "amqp://sat7:***@broker.example" in proc.stdout
    assert "pa55-w0rd-xyz" not in proc.stdout + proc.stderr
    [lane] = [line for line in proc.stdout.splitlines() if "INTERACTIVE_PROCESS" in line]
    assert lane.split() == ["USM_POLLER_INTERACTIVE_PROCESS", "True"]  # the default


def test_version() -> None:
    proc = run_cli("--version", env=dict(os.environ))
    assert proc.stdout.strip() == f"poller {__version__}"


def test_missing_ca_file_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("US_AMQP_DSN", "amqps://u:p@h/")
    monkeypatch.setenv("USM_POLLER_TLS_CA_FILE", "/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match=r"^USM_POLLER_TLS_CA_FILE: cannot load /nonexistent"):
        load_settings().ssl_contexts()


def test_key_without_certificate_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("US_AMQP_DSN", "amqps://u:p@h/?keyfile=/k.pem")
    with pytest.raises(ConfigError, match="key file without a certificate"):
        load_settings().ssl_contexts()


def test_tls_settings_need_an_amqps_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USM_POLLER_TLS_CA_FILE", "/ca.pem")
    with pytest.raises(ConfigError, match="has no amqps:// URL"):
        load_settings().ssl_contexts()
    monkeypatch.setenv("US_AMQP_DSN", "amqp://u:p@h/?server_hostname=x")
    with pytest.raises(ConfigError, match="TLS options but is not amqps"):
        load_settings()


def test_verifying_context_for_amqps() -> None:
    os.environ["US_AMQP_DSN"] = "amqp://u:p@a/,amqps://u:p@b/"
    contexts = load_settings().ssl_contexts()
    assert list(contexts) == [1]
    assert contexts[1].check_hostname
    assert contexts[1].verify_mode.name == "CERT_REQUIRED"
