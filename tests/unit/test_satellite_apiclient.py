"""`satellite.apiclient`: `--api` addresses, the token's sources, and the CLI's rendering of
what the core API sends (the same screen as over AMQP). Requests to a real service are in
tests/integration/test_satellite_api_cli.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from poller.errors import ConfigError
from poller.wire import Heartbeat
from satellite import render
from satellite.apiclient import ApiAddress, parse_addresses, resolve_token
from satellite.cli import main as satellite_cli
from satellite.status import FleetView, satellite_status


def test_addresses_keep_their_order_unix_and_tcp() -> None:
    found = parse_addresses(
        " unix:/run/satellite/api.sock , https://core.example:8480/ ,http://127.0.0.1:8480/api"
    )
    assert found == [
        ApiAddress("unix:/run/satellite/api.sock", socket_path="/run/satellite/api.sock"),
        ApiAddress("https://core.example:8480/", base_url="https://core.example:8480"),
        ApiAddress("http://127.0.0.1:8480/api", base_url="http://127.0.0.1:8480/api"),
    ]
    assert parse_addresses("unix:///run/a.sock")[0].socket_path == "/run/a.sock"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "no address"),
        (" , ", "no address"),
        ("unix:run/api.sock", "absolute path"),
        ("tcp:127.0.0.1:8480", "expected unix:/path"),
        ("core.example:8480", "expected unix:/path"),
        ("http://", "expected unix:/path"),
        ("http://127.0.0.1:99999", "Port out of range"),
        ("https://u:secret@core:8480", "no user or password"),
        ("http://core:8480/?x=1", "no ?query"),
    ],
)
def test_a_bad_address_is_a_config_error_naming_the_option(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=r"^--api: ") as caught:
        parse_addresses(text, label="--api")
    assert says in str(caught.value)
    assert "secret" not in str(caught.value)


def test_the_token_comes_from_the_option_then_the_file_variable_then_the_variable(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").write_text("usm_from_option\n")
    (tmp_path / "b").write_text("  usm_from_file_env ")
    env = {"USM_CORE_TOKEN_FILE": str(tmp_path / "b"), "USM_CORE_TOKEN": "usm_from_env"}
    assert resolve_token(str(tmp_path / "a"), env) == "usm_from_option"
    assert resolve_token(None, env) == "usm_from_file_env"
    assert resolve_token(None, {"USM_CORE_TOKEN": "usm_from_env"}) == "usm_from_env"
    assert resolve_token(None, {}) is None


def test_a_bad_token_source_is_one_line_naming_it_without_the_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--token-file: cannot read .*No such file"):
        resolve_token(str(tmp_path / "missing"), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"^USM_CORE_TOKEN_FILE: the token is empty"):
        resolve_token(None, {"USM_CORE_TOKEN_FILE": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match=r"^USM_CORE_TOKEN: the token holds spaces") as caught:
        resolve_token(None, {"USM_CORE_TOKEN": "usm_secret with space"})
    assert "secret" not in str(caught.value)


def test_cli_option_errors_exit_2_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("USM_CORE_API", raising=False)
    cases = [
        (["jobs"], "jobs: give the core service's address: --api or $USM_CORE_API"),
        (["jobs", "--api", "tcp:x:1"], "--api: 'tcp:x:1': expected"),
        (["jobs", "--api", "unix:/x.sock", "--limit", "0"], "--limit: must be 1-1000"),
        (["jobs", "--api", "unix:/x.sock", "--since", "yesterday"], "--since: 'yesterday'"),
        (["job", "x", "--api", "unix:/x.sock", "--wait", "-1"], "--wait of 0 or more"),
        (
            [
                "submit",
                "7",
                "snmp.get",
                "--host",
                "h",
                "-c",
                "c",
                "1.3",
                "--api",
                "unix:/x.sock",
                "--priority",
                "3",
            ],
            "--priority: not available through the core API",
        ),
    ]
    for argv, says in cases:
        assert satellite_cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, (argv, err)
        assert says in err, (argv, err)
    monkeypatch.setenv("USM_CORE_API", "ftp://x")
    assert satellite_cli(["status"]) == 2
    assert "USM_CORE_API: 'ftp://x'" in capsys.readouterr().err


def _beat(worker: str) -> Heartbeat:
    now = datetime.now(UTC)
    return Heartbeat(
        satellite_id="7",
        worker=worker,
        version="1",
        hostname="site-7-host",
        started_at=now - timedelta(hours=2),
        sent_at=now,
        concurrency=10,
        in_flight=2,
        jobs_ok=5,
        jobs_error=1,
        jobs_per_s=3.5,
        loop_lag_ms=0.4,
        rss_bytes=50_000_000,
    )


def test_status_from_the_api_looks_like_status_over_amqp(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    fleet = FleetView()
    fleet.add(_beat("w1"))
    fleet.add(_beat("w2").model_copy(update={"recycles": 2, "last_recycle": "rss"}))
    queue = {"name": "usm_poller-sat-7", "messages_ready": 4, "consumers": 2}
    status = satellite_status("7", queue=queue, dlq=None, fleet=fleet, core_version="2")
    render.status([status])
    over_amqp = capsys.readouterr().out
    render.status([json.loads(json.dumps(status.as_dict()))])  # as the API sends it
    over_api = capsys.readouterr().out
    assert over_api == over_amqp
    assert "w2" in over_api
    assert "2 (rss)" in over_api
    assert "version skew" in over_api


def _record(n: int) -> dict[str, object]:
    return {
        "id": f"0b5c6a0e-7d7f-4a7c-9a51-{n:012d}",
        "satellite_id": "site-7",
        "kind": "snmp.get",
        "host": "10.0.0.5",
        "port": 161,
        "source": "api",
        "status": "error" if n % 2 else "ok",
        "error_code": "device_timeout" if n % 2 else None,
        "created_at": "2026-12-06T21:00:00.123456Z",
        "submitted_at": "2026-12-06T21:00:00.123456Z",
        "duration_ms": 12.5,
        "answers": 1,
        "worker": "site-7-a",
        "result": {"status": "ok"},
    }


@pytest.mark.parametrize("width", [200, 100, 60])
def test_the_job_table_fits_the_terminal_without_cutting_ids(
    width: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", str(width))
    records = [_record(n) for n in range(3)]
    render.job_table(records)
    out = capsys.readouterr().out
    assert all(len(line) <= width for line in out.splitlines()), out
    assert "device_timeout" in out
    assert "3 job(s)" in out
    assert "…" not in out  # ids fold onto a second line, never cut
    words = out.split()
    for r in records:
        head, tail = str(r["id"])[:20], str(r["id"])[-8:]
        assert any(w.startswith(head) for w in words), out
        assert any(w.endswith(tail) for w in words), out
    if width == 200:
        assert "2026-12-06 21:00:00" in out
        assert "not shown" not in out
    else:
        assert "not shown at this width" in out


def test_one_job_shows_its_fields_and_result(capsys: pytest.CaptureFixture[str]) -> None:
    render.job_record(_record(1) | {"retry_of": "old-id"})
    out = capsys.readouterr().out
    assert "status:    error" in out
    assert "retry of:  old-id" in out
    assert json.loads(out.split("result:\n", 1)[1]) == {"status": "ok"}
