"""`USM_CORE_TOKENS_FILE`: create, list, revoke, verify, reload on change, clear errors."""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from poller.errors import ConfigError
from satellite.service.tokens import (
    TOKENS_ENV,
    Token,
    TokensError,
    TokensFile,
    default_tokens_path,
    hash_token,
)

HASH = "sha256:" + "ab" * 32


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tokens.yaml"


def test_create_prints_a_random_token_once_and_stores_only_its_hash(path: Path) -> None:
    tokens = TokensFile(path)
    clear = tokens.create("nagios", ["read"], now=datetime(2026, 12, 6, 20, 0, 1, 5, tzinfo=UTC))
    assert re.fullmatch(r"usm_[A-Za-z0-9_-]{43}", clear)
    text = path.read_text()
    assert clear not in text
    assert clear[4:] not in text
    data = yaml.safe_load(text)
    assert data == {
        "tokens": [
            {
                "name": "nagios",
                "hash": hash_token(clear),
                "scopes": ["read"],
                "created_at": "2026-12-06T20:00:01Z",
            }
        ]
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == ["tokens.yaml"]  # no temporary file left
    assert clear != tokens.create("other", ["read"])


def test_verify_finds_the_token_and_nothing_else(path: Path) -> None:
    tokens = TokensFile(path)
    clear = tokens.create("ops", ["admin"])
    found = tokens.verify(clear)
    assert found is not None
    assert found.name == "ops"
    assert found.scopes == {"admin"}
    for wrong in (clear[:-1], clear + "x", clear.upper(), "", "usm_", "a b", "é" * 10, "x" * 600):
        assert tokens.verify(wrong) is None
    assert "sha256" not in repr(found)


def test_scopes_are_ranked() -> None:
    def token(*scopes: str) -> Token:
        return Token("t", HASH, frozenset(scopes), datetime.now(UTC))  # type: ignore[arg-type]

    assert [token("read").allows(s) for s in ("read", "submit", "admin")] == [True, False, False]
    assert [token("submit").allows(s) for s in ("read", "submit", "admin")] == [True, True, False]
    assert [token("admin").allows(s) for s in ("read", "submit", "admin")] == [True, True, True]
    assert token("admin", "read").sorted_scopes == ["read", "admin"]


def test_a_duplicate_name_is_refused_and_the_file_kept(path: Path) -> None:
    tokens = TokensFile(path)
    tokens.create("nagios", ["read"])
    before = path.read_bytes()
    with pytest.raises(TokensError) as caught:
        tokens.create("nagios", ["admin"])
    assert str(caught.value) == (
        f"USM_CORE_TOKENS_FILE: {path}: a token named 'nagios' exists already (revoke it first)"
    )
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("name", "scopes", "message"),
    [
        ("has space", ["read"], "token name 'has space': use letters, digits"),
        ("-x", ["read"], "token name '-x': use letters"),
        ("x" * 65, ["read"], "use letters"),
        ("ok", [], "give at least one scope: read, submit or admin"),
        ("ok", ["read", "write"], "scope 'write': expected read, submit or admin"),
    ],
)
def test_bad_create_arguments(path: Path, name: str, scopes: list[str], message: str) -> None:
    with pytest.raises(TokensError, match=re.escape(message)):
        TokensFile(path).create(name, scopes)
    assert not path.exists()


def test_revoke_and_list(path: Path) -> None:
    tokens = TokensFile(path)
    first = tokens.create("a", ["read"])
    tokens.create("b", ["submit", "read"])
    assert [(t.name, t.sorted_scopes) for t in tokens.list()] == [
        ("a", ["read"]),
        ("b", ["read", "submit"]),
    ]
    revoked = tokens.revoke("a")
    assert revoked is not None
    assert revoked.name == "a"
    assert tokens.verify(first) is None
    assert [t.name for t in tokens.list()] == ["b"]
    assert tokens.revoke("a") is None


def test_the_service_sees_changes_without_a_restart(path: Path) -> None:
    service = TokensFile(path)
    cli = TokensFile(path)
    assert service.list() == []  # no file yet: no tokens
    clear = cli.create("nagios", ["read"])
    assert service.verify(clear) is not None
    cli.revoke("nagios")
    assert service.verify(clear) is None
    # Quick rewrites of equal size (the inode number may be reused) are still seen.
    for round_ in range(20):
        again = cli.create(f"n{round_ % 10}", ["read"])
        found = service.verify(again)
        assert found is not None
        assert found.name == f"n{round_ % 10}"
        cli.revoke(f"n{round_ % 10}")
        assert service.verify(again) is None


def test_an_unchanged_file_is_read_once(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clear = TokensFile(path).create("nagios", ["read"])
    service = TokensFile(path)
    caplog.set_level(logging.INFO, "satellite.service.tokens")
    for _ in range(50):
        assert service.verify(clear) is not None
    assert caplog.messages == [f"tokens_loaded path={path} tokens=1"]


def test_writes_keep_the_mode_and_owner_of_an_existing_file(path: Path) -> None:
    tokens = TokensFile(path)
    tokens.create("a", ["read"])
    path.chmod(0o640)  # e.g. made readable by the service's group
    tokens.create("b", ["read"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    tokens.revoke("a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_concurrent_writers_lose_nothing(path: Path) -> None:
    errors: list[BaseException] = []

    def create(index: int) -> None:
        try:
            TokensFile(path).create(f"t{index}", ["read"])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert sorted(t.name for t in TokensFile(path).list()) == [f"t{i}" for i in range(8)]


# ------------------------------------------------------------------------------- bad files


def _entry(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "n",
        "hash": HASH,
        "scopes": ["read"],
        "created_at": "2026-12-06T20:00:00Z",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


SECRET = "usm_ThisIsAClearTokenPastedByMistake0123456789abc"


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("tokens: [\n", "line 2: expected the node content"),
        ("- a\n- b\n", "expected a mapping with a `tokens:` list"),
        ("tokenz: []\n", "tokenz: is not a known field"),
        ({"tokens": [_entry(), _entry(name="m", scopes=["root"])]}, "tokens[1] (m): scopes.0: "),
        ({"tokens": [_entry(scopes=[])]}, "tokens[0] (n): scopes: List should have at least 1"),
        ({"tokens": [_entry(hash=None)]}, "tokens[0] (n): hash: is required"),
        ({"tokens": [_entry(hash=SECRET)]}, "tokens[0] (n): hash: expected sha256:<64 hex digits>"),
        ({"tokens": [_entry(name="bad name!")]}, "tokens[0]: name: use letters, digits"),
        ({"tokens": [_entry(colour="red")]}, "tokens[0] (n): colour: is not a known field"),
        ({"tokens": [_entry(created_at="2026-12-06T20:00:00")]}, "tokens[0] (n): created_at: "),
        ({"tokens": [_entry(), _entry(hash="sha256:" + "cd" * 32)]}, "the name 'n' is used twice"),
        ({"tokens": [_entry(), _entry(name="m")]}, "tokens[1] (m): the hash is used twice"),
    ],
)
def test_bad_files_give_one_line_naming_the_entry_and_field(
    path: Path, content: object, detail: str
) -> None:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    with pytest.raises(TokensError) as caught:
        TokensFile(path).load()
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError)
    assert message.startswith(f"{TOKENS_ENV}: {path}: ")
    assert detail in message
    assert "\n" not in message
    assert SECRET not in message


def test_an_empty_file_has_no_tokens(path: Path) -> None:
    path.write_text("# nothing yet\n")
    assert TokensFile(path).list() == []


def test_a_broken_file_fails_closed_until_fixed(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = TokensFile(path)
    clear = TokensFile(path).create("nagios", ["read"])
    good = path.read_text()
    assert service.verify(clear) is not None
    path.write_text(good + "  oops: [\n")  # a hand edit gone wrong
    caplog.set_level(logging.INFO, "satellite.service.tokens")
    for _ in range(3):
        with pytest.raises(TokensError, match=r"tokens\.yaml: line \d+: "):
            service.verify(clear)
    assert len(caplog.messages) == 1  # logged once
    assert caplog.messages[0].startswith(f"tokens_file_invalid: USM_CORE_TOKENS_FILE: {path}: line")
    path.write_text(good)
    assert service.verify(clear) is not None


def test_unreadable_directory_for_writes_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TokensError, match=r"file/tokens\.yaml: cannot use the directory: "):
        TokensFile(blocker / "tokens.yaml").create("a", ["read"])


def test_default_path() -> None:
    assert default_tokens_path({}) == Path("/var/lib/satellite/tokens.yaml")
    assert default_tokens_path({"USM_CORE_STATE_DIR": ".satellite"}) == Path(
        ".satellite/tokens.yaml"
    )
    assert default_tokens_path(
        {"USM_CORE_STATE_DIR": "/s", "USM_CORE_TOKENS_FILE": "/etc/t.yaml"}
    ) == Path("/etc/t.yaml")


def test_a_rewrite_always_moves_the_mtime_forward(path: Path) -> None:
    """Readers compare (mtime, size, inode); file times tick coarsely and inodes are reused."""
    tokens = TokensFile(path)
    tokens.create("a", ["read"])
    ahead = path.stat().st_mtime_ns + 10**10  # as if the last write had been 10 s from now
    os.utime(path, ns=(ahead, ahead))
    tokens.create("b", ["read"])
    assert path.stat().st_mtime_ns > ahead
