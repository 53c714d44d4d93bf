"""`satellite token create|list|revoke` as real processes: output, files, exit codes, no broker."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from satellite.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from satellite.service.tokens import TokensFile, hash_token
from tests.support.satellite_cli import Run

TOKEN = re.compile(r"usm_[A-Za-z0-9_-]{43}")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """No broker settings at all (token commands must not need them); a state dir of our own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("USM_", "US_AMQP"))}
    clean["USM_CORE_STATE_DIR"] = str(tmp_path / "state")
    return clean


def satellite(env: dict[str, str], *argv: str) -> Run:
    done = subprocess.run(
        [sys.executable, "-m", "satellite.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def test_create_prints_the_token_once_and_the_file_holds_its_hash(
    env: dict[str, str], tmp_path: Path
) -> None:
    run = satellite(env, "token", "create", "nagios", "--scope", "read")
    assert run.code == EXIT_OK, run.err
    assert TOKEN.fullmatch(run.out.strip())
    clear = run.out.strip()
    path = tmp_path / "state" / "tokens.yaml"
    assert run.err == f"token 'nagios' (read) added to {path}; it is not shown again\n"
    text = path.read_text()
    assert clear not in text
    assert yaml.safe_load(text)["tokens"][0]["hash"] == hash_token(clear)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # What the service would check: the same file, the same token.
    found = TokensFile(path).verify(clear)
    assert found is not None
    assert found.name == "nagios"


def test_create_json(env: dict[str, str]) -> None:
    run = satellite(
        env, "token", "create", "ops", "--scope", "submit", "--scope", "admin", "--json"
    )
    assert run.code == EXIT_OK, run.err
    data = json.loads(run.out)
    assert set(data) == {"name", "token"}
    assert data["name"] == "ops"
    assert TOKEN.fullmatch(data["token"])
    assert run.err == ""


def test_list_and_revoke(env: dict[str, str]) -> None:
    assert satellite(env, "token", "list").out == "no tokens\n"
    clear = satellite(env, "token", "create", "nagios", "--scope", "read").out.strip()
    satellite(env, "token", "create", "deploy-bot", "--scope", "admin", "--scope", "read")

    run = satellite(env, "token", "list")
    assert run.code == EXIT_OK
    lines = run.out.splitlines()
    assert lines[0].split() == ["NAME", "SCOPES", "CREATED"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["nagios", "read"],
        ["deploy-bot", "read,admin"],
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lines[1].split()[2])
    assert "sha256" not in run.out

    listed = json.loads(satellite(env, "token", "list", "--json").out)
    assert listed["ok"] is True
    assert [(t["name"], t["scopes"]) for t in listed["tokens"]] == [
        ("nagios", ["read"]),
        ("deploy-bot", ["read", "admin"]),
    ]
    assert listed["tokens"][0]["hash"] == hash_token(clear)

    run = satellite(env, "token", "revoke", "nagios")
    assert (run.code, run.out) == (EXIT_OK, "revoked token 'nagios'\n")
    run = satellite(env, "token", "revoke", "nagios")
    assert run.code == EXIT_ERROR
    assert run.err.startswith("satellite: no token named 'nagios' in ")
    run = satellite(env, "token", "revoke", "deploy-bot", "--json")
    assert json.loads(run.out) == {"ok": True, "revoked": "deploy-bot"}
    assert json.loads(satellite(env, "token", "list", "--json").out)["tokens"] == []


def test_where_the_file_is(env: dict[str, str], tmp_path: Path) -> None:
    satellite(env, "token", "create", "a", "--scope", "read")
    assert (tmp_path / "state" / "tokens.yaml").exists()

    env["USM_CORE_TOKENS_FILE"] = str(tmp_path / "from-env.yaml")
    satellite(env, "token", "create", "b", "--scope", "read")
    assert [t.name for t in TokensFile(tmp_path / "from-env.yaml").list()] == ["b"]

    given = tmp_path / "given.yaml"
    satellite(env, "token", "create", "c", "--scope", "read", "--tokens-file", str(given))
    assert [t.name for t in TokensFile(given).list()] == ["c"]
    assert [t.name for t in TokensFile(tmp_path / "from-env.yaml").list()] == ["b"]


def test_errors_are_one_line_with_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    satellite(env, "token", "create", "nagios", "--scope", "read")
    path = tmp_path / "state" / "tokens.yaml"

    run = satellite(env, "token", "create", "nagios", "--scope", "admin")
    assert (run.code, run.out) == (EXIT_USAGE, "")
    assert run.err == (
        f"satellite: USM_CORE_STATE_DIR: {path}: a token named 'nagios' exists already"
        " (revoke it first)\n"
    )

    run = satellite(env, "token", "create", "x", "--scope", "write")
    assert run.code == EXIT_USAGE
    assert run.err.count("\n") == 1
    assert "argument --scope: invalid choice: 'write'" in run.err

    run = satellite(env, "token", "create", "x")
    assert run.code == EXIT_USAGE
    assert "the following arguments are required: --scope" in run.err

    run = satellite(env, "token", "create", "bad name", "--scope", "read", "--json")
    assert run.code == EXIT_USAGE
    assert json.loads(run.out)["error"]["code"] == "usage"

    given = tmp_path / "broken.yaml"
    given.write_text("tokens:\n- name: a\n  hash: [\n")
    run = satellite(env, "token", "list", "--tokens-file", str(given))
    assert run.code == EXIT_USAGE
    assert run.err.startswith(f"satellite: --tokens-file: {given}: line ")
    assert run.err.count("\n") == 1


def test_the_token_appears_only_on_stdout_once(env: dict[str, str]) -> None:
    run = satellite(env, "token", "create", "nagios", "--scope", "read")
    clear = run.out.strip()
    assert run.out.count(clear) == 1
    assert clear not in run.err
    later = [
        satellite(env, "token", "list"),
        satellite(env, "token", "list", "--json"),
        satellite(env, "token", "revoke", "nagios"),
    ]
    for other in later:
        assert clear not in other.out + other.err
