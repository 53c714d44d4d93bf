"""Named credentials kept on the satellite, for jobs that send `credential_ref` instead of `auth`.

The file (`USM_POLLER_CREDENTIALS_FILE`) is YAML, one mapping per name:

```yaml
core-v2c: {version: "2c", community: "s3cret"}
core-v3: {version: "3", user: poller, auth_protocol: SHA256, auth_key: "...", priv_protocol: AES,
          priv_key: "..."}
switches-ssh: {username: noc, password: "...", enable_password: "..."}
```

An entry whose keys all belong to SNMP auth is an SNMP credential; otherwise it is a CLI one.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from poller.errors import ConfigError, CredentialNotFoundError
from poller.wire import CliAuth, JobRequest, SnmpAuth

__all__ = ["CredentialStore"]

_SNMP_FIELDS = frozenset(SnmpAuth.model_fields)
_SETTING = "USM_POLLER_CREDENTIALS_FILE"


class CredentialStore:
    """Resolves a job's credentials: its inline `auth`, or a named entry of the file."""

    def __init__(self, entries: dict[str, SnmpAuth | CliAuth] | None = None) -> None:
        self._entries = dict(entries or {})

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path | None) -> CredentialStore:
        """Read and validate the whole file at start-up; `ConfigError` names what is wrong."""
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{_SETTING}: cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError:
            raise ConfigError(f"{_SETTING}: {path} is not valid YAML") from None
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{_SETTING}: {path} must map credential names to settings")
        entries: dict[str, SnmpAuth | CliAuth] = {}
        for name, value in data.items():
            if not isinstance(value, dict):
                raise ConfigError(f"{_SETTING}: entry {name!r} must be a mapping")
            snmp = value.keys() <= _SNMP_FIELDS
            model: type[SnmpAuth | CliAuth] = SnmpAuth if snmp else CliAuth
            try:
                entries[str(name)] = model.model_validate(value)
            except ValidationError as exc:
                err = exc.errors(include_input=False, include_url=False)[0]
                where = ".".join(str(p) for p in err["loc"]) or "entry"
                reason = err["msg"].removeprefix("Value error, ")
                raise ConfigError(f"{_SETTING}: entry {name!r}: {where}: {reason}") from None
        return cls(entries)

    def resolve(self, job: JobRequest) -> SnmpAuth | CliAuth | None:
        """The job's credentials, or `CredentialNotFoundError`."""
        auth: SnmpAuth | CliAuth | None = getattr(job, "auth", None)
        if auth is not None or job.credential_ref is None:
            return auth
        entry = self._entries.get(job.credential_ref)
        if entry is None:
            raise CredentialNotFoundError(
                f"no credential named {job.credential_ref!r} on this satellite"
            )
        wanted = SnmpAuth if job.kind.startswith("snmp.") else CliAuth
        if not isinstance(entry, wanted):
            raise CredentialNotFoundError(
                f"credential {job.credential_ref!r} is not usable for {job.kind} jobs"
            )
        return entry
