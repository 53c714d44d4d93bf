"""Bearer tokens of the core service: `USM_CORE_TOKENS_FILE`, YAML holding hashes only.

```yaml
tokens:
- name: nagios                    # unique: letters, digits, '.', '_', '-' (at most 64)
  hash: sha256:9f86d0818...       # of the clear token, which was printed once
  scopes: [read]                  # read, submit, admin
  created_at: '2026-12-06T20:00:00Z'
```

Scopes are ranked: `admin` implies `submit`, which implies `read` (a `submit` token can read
what it submitted; an `admin` token can do everything). The file keeps the scopes as given.

`TokensFile.verify()` re-reads the file when its modification time, size or inode changed (one
`stat()` per call), so `satellite token create|revoke` take effect on the next request without a
restart. A file that cannot be read or is invalid fails closed: `verify()` raises
`TokensError` until it is fixed (a hand edit that revokes a token must not leave every old token
valid by keeping the last good copy). A missing file means no tokens yet.

`create()` and `revoke()` rewrite the file atomically (a temporary file in the same directory,
fsync, rename) under an exclusive lock on the directory; a new file gets mode 0600, an existing
one keeps its mode, owner and group (so a file made readable by the service's group stays so).
Clear tokens are never stored or logged; `Token`'s repr shows no hash either.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from poller.errors import ConfigError

__all__ = [
    "DEFAULT_STATE_DIR",
    "SCOPES",
    "STATE_DIR_ENV",
    "TOKENS_ENV",
    "Scope",
    "Token",
    "TokensError",
    "TokensFile",
    "default_tokens_path",
    "hash_token",
    "new_token",
]

TOKENS_ENV = "USM_CORE_TOKENS_FILE"
STATE_DIR_ENV = "USM_CORE_STATE_DIR"
DEFAULT_STATE_DIR = Path("/var/lib/satellite")
TOKEN_PREFIX = "usm_"  # noqa: S105 - the marker tokens start with, not a secret
LOCK_TIMEOUT = 10.0
"""Seconds `create`/`revoke` wait for another writer of the same directory."""

Scope = Literal["read", "submit", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
_RANK: dict[str, int] = {scope: rank for rank, scope in enumerate(SCOPES)}
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# RFC 6750 b64token, bounded: anything else in an Authorization header is not one of ours.
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]{1,512}=*$")
_HEADER = (
    "# Bearer tokens of `satellite serve` (USM_CORE_TOKENS_FILE): hashes only; each clear token\n"
    "# was printed once by `satellite token create`. Change with `satellite token create|revoke`.\n"
)

log = logging.getLogger(__name__)


class TokensError(ConfigError):
    """The tokens file cannot be read or is invalid, or a change to it is refused (one line)."""


def hash_token(token: str) -> str:
    """`sha256:<hex>` of the clear token.

    A plain SHA-256 is enough, no salt or slow hash: the tokens are 256-bit random values (from
    `new_token()`), so there is no dictionary to try, and finding a preimage of a 256-bit hash is
    as hard as guessing the token itself. Salting and stretching protect low-entropy passwords;
    here they would only cost time on every request.
    """
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """`usm_` and 43 URL-safe characters: 32 bytes from the OS's CSPRNG."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def default_tokens_path(environ: Mapping[str, str] | None = None) -> Path:
    """`USM_CORE_TOKENS_FILE`, else `tokens.yaml` in `USM_CORE_STATE_DIR` (/var/lib/satellite)."""
    env = os.environ if environ is None else environ
    if env.get(TOKENS_ENV):
        return Path(env[TOKENS_ENV])
    return Path(env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR) / "tokens.yaml"


@dataclass(frozen=True, slots=True)
class Token:
    """One token as the file describes it (never the clear token)."""

    name: str
    hash: str = field(repr=False)
    scopes: frozenset[Scope]
    created_at: datetime

    def allows(self, scope: Scope) -> bool:
        """Whether the token grants `scope` (admin ⊇ submit ⊇ read)."""
        return max(_RANK[s] for s in self.scopes) >= _RANK[scope]

    @property
    def sorted_scopes(self) -> list[Scope]:
        return sorted(self.scopes, key=_RANK.__getitem__)

    def as_dict(self, *, with_hash: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "scopes": self.sorted_scopes,
            "created_at": _iso(self.created_at),
        }
        if with_hash:
            out["hash"] = self.hash
        return out


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=_NAME)]
    hash: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    scopes: Annotated[list[Scope], Field(min_length=1)]
    created_at: AwareDatetime


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[_Entry] = []


_Signature = tuple[int, int, int, int]


class TokensFile:
    """The tokens file at `path`; `label` names where the path came from in error messages."""

    def __init__(self, path: Path | str, *, label: str = TOKENS_ENV) -> None:
        self.path = Path(path)
        self.label = label
        self._lock = threading.Lock()
        self._signature: _Signature | None = None
        self._loaded = False
        self._by_hash: dict[str, Token] = {}
        self._tokens: builtins.list[Token] = []
        self._error: TokensError | None = None

    def __repr__(self) -> str:
        return f"TokensFile({str(self.path)!r})"

    # ------------------------------------------------------------------------------- reading

    def load(self) -> None:
        """Read the file now (at start-up, to refuse a bad file); raise `TokensError`."""
        self._refresh()

    def list(self) -> builtins.list[Token]:
        """The tokens, oldest first; raise `TokensError` when the file is unreadable or invalid."""
        self._refresh()
        return list(self._tokens)

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def verify(self, token: str) -> Token | None:
        """The token whose hash matches `token`, else None; raise `TokensError` (fail closed).

        The lookup is by hash, so its timing depends only on the SHA-256 of the candidate, which
        tells an attacker nothing about any stored token; the final comparison is constant-time.
        """
        self._refresh(log_errors=True)
        if not _TOKEN.match(token):
            return None
        digest = hash_token(token)
        found = self._by_hash.get(digest)
        if found is None or not hmac.compare_digest(found.hash, digest):
            return None
        return found

    def _refresh(self, *, log_errors: bool = False) -> None:
        with self._lock:
            try:
                signature: _Signature | None = _signature(os.stat(self.path))
            except FileNotFoundError:
                signature = None
            except OSError as exc:
                error = self._error_for(f"cannot read: {exc.strerror}")
                self._fail(error, None, log_errors)
                raise error from None
            if self._loaded and signature == self._signature:
                if self._error is not None:
                    raise self._error
                return
            try:
                tokens, signature = self._read()
            except TokensError as exc:
                self._fail(exc, signature, log_errors)
                raise
            self._tokens = tokens
            self._by_hash = {token.hash: token for token in tokens}
            self._signature, self._loaded, self._error = signature, True, None
            log.info("tokens_loaded path=%s tokens=%d", self.path, len(tokens))

    def _fail(self, error: TokensError, signature: _Signature | None, log_errors: bool) -> None:
        # The service logs a new problem once (every refused request is logged by auth); the
        # CLI does not: the exception is its one line.
        if log_errors and (self._error is None or str(self._error) != str(error)):
            log.error("tokens_file_invalid: %s", error)
        self._tokens, self._by_hash = [], {}
        self._signature, self._loaded, self._error = signature, True, error

    def _read(self) -> tuple[builtins.list[Token], _Signature | None]:
        try:
            with self.path.open("rb") as handle:
                signature = _signature(os.fstat(handle.fileno()))
                text = handle.read()
        except FileNotFoundError:
            return [], None
        except OSError as exc:
            raise self._error_for(f"cannot read: {exc.strerror}") from None
        return self._parse(text), signature

    def _parse(self, text: bytes) -> builtins.list[Token]:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise self._error_for(f"{where}{problem}") from None
        except UnicodeDecodeError:
            raise self._error_for("not UTF-8 text") from None
        if data is None:
            return []
        if not isinstance(data, dict):
            raise self._error_for("expected a mapping with a `tokens:` list")
        try:
            parsed = _File.model_validate(data)
        except ValidationError as exc:
            raise self._error_for(_describe(exc, data)) from None
        tokens: builtins.list[Token] = []
        names: set[str] = set()
        hashes: set[str] = set()
        for index, entry in enumerate(parsed.tokens):
            if entry.name in names:
                raise self._error_for(f"tokens[{index}]: the name {entry.name!r} is used twice")
            if entry.hash in hashes:
                raise self._error_for(f"tokens[{index}] ({entry.name}): the hash is used twice")
            names.add(entry.name)
            hashes.add(entry.hash)
            tokens.append(Token(entry.name, entry.hash, frozenset(entry.scopes), entry.created_at))
        return tokens

    def _error_for(self, detail: str) -> TokensError:
        return TokensError(f"{self.label}: {self.path}: {detail}")

    # ------------------------------------------------------------------------------- writing

    def create(self, name: str, scopes: Iterable[str], *, now: datetime | None = None) -> str:
        """Add a token; return the clear token (shown once, never stored). Raise `TokensError`."""
        if not re.match(_NAME, name):
            raise TokensError(
                f"token name {name!r}: use letters, digits, '.', '_' and '-' (at most 64,"
                " starting with a letter or digit)"
            )
        wanted = list(scopes)
        if not wanted:
            raise TokensError("give at least one scope: read, submit or admin")
        for scope in wanted:
            if scope not in _RANK:
                raise TokensError(f"scope {scope!r}: expected read, submit or admin")
        clear = new_token()
        created = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        with self._write_lock():
            tokens = self._read()[0]
            if any(token.name == name for token in tokens):
                raise self._error_for(f"a token named {name!r} exists already (revoke it first)")
            scope_set = frozenset(s for s in SCOPES if s in wanted)
            tokens.append(Token(name, hash_token(clear), scope_set, created))
            self._write(tokens)
        return clear

    def revoke(self, name: str) -> Token | None:
        """Remove the token called `name`; return it, or None if there was none."""
        with self._write_lock():
            tokens = self._read()[0]
            kept = [token for token in tokens if token.name != name]
            if len(kept) == len(tokens):
                return None
            self._write(kept)
        return next(token for token in tokens if token.name == name)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise self._error_for(f"cannot use the directory: {exc.strerror}") from None
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise self._error_for(
                            f"another process keeps {directory} locked; try again"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, tokens: builtins.list[Token]) -> None:
        entries = [
            {
                "name": token.name,
                "hash": token.hash,
                "scopes": token.sorted_scopes,
                "created_at": _iso(token.created_at),
            }
            for token in tokens
        ]
        text = _HEADER + yaml.safe_dump(
            {"tokens": entries}, sort_keys=False, default_flow_style=None
        )
        directory = self.path.parent
        try:
            existing: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            existing = None
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)  # 0600
        try:
            if existing is not None:
                with contextlib.suppress(PermissionError):  # not root: stays the writer's
                    os.fchown(fd, existing.st_uid, existing.st_gid)
                os.fchmod(fd, existing.st_mode & 0o7777)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                if existing is not None:
                    _newer_than(handle.fileno(), existing)
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise self._error_for(f"cannot write: {exc.strerror}") from None
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _signature(info: os.stat_result) -> _Signature:
    return (info.st_mtime_ns, info.st_size, info.st_ino, info.st_dev)


def _newer_than(fd: int, old: os.stat_result) -> None:
    """Make the new file's mtime later than the old one's.

    File times tick with the kernel's coarse clock (milliseconds) and a freed inode number is
    often reused, so two quick rewrites of equal size could otherwise look unchanged to a reader
    comparing (mtime, size, inode).
    """
    new = os.fstat(fd)
    if new.st_mtime_ns <= old.st_mtime_ns:
        os.utime(fd, ns=(new.st_atime_ns, old.st_mtime_ns + 1))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _describe(exc: ValidationError, data: Mapping[str, Any]) -> str:
    """The first problem as `tokens[2] (nagios): scopes.0: <message>`, never the value."""
    error = exc.errors(include_url=False, include_input=False)[0]
    loc = list(error["loc"])
    where = ""
    if loc[:1] == ["tokens"] and len(loc) >= 2 and isinstance(loc[1], int):
        index = loc[1]
        where = f"tokens[{index}]"
        entries = data.get("tokens")
        if isinstance(entries, list) and isinstance(entries[index], dict):
            name = entries[index].get("name")
            if isinstance(name, str) and re.match(_NAME, name):
                where += f" ({name})"
        loc = loc[2:]
    elif loc:
        where = str(loc[0])
        loc = loc[1:]
    path = ".".join(str(part) for part in loc)
    message = error["msg"]
    if error["type"] == "missing":
        message = "is required"
    elif error["type"] == "extra_forbidden":
        message = "is not a known field"
    elif error["type"] == "string_pattern_mismatch" and path == "hash":
        message = "expected sha256:<64 hex digits>"
    elif error["type"] == "string_pattern_mismatch" and path == "name":
        message = "use letters, digits, '.', '_' and '-' (at most 64)"
    return ": ".join(part for part in (where, path, message) if part)
