"""Vendor CLI platforms: `platforms.yaml` loaded and validated into models, once per process."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

__all__ = ["EnableSpec", "PagerSpec", "Platform", "load_platforms", "platform_names"]

_FLAGS = re.IGNORECASE
Regex = Annotated[str, StringConstraints(min_length=1, max_length=512)]


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, _FLAGS)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PagerSpec(_Model):
    """A pager prompt at the end of the unfinished line, and the key that moves on."""

    pattern: Regex
    answer: Annotated[str, StringConstraints(min_length=1, max_length=8)] = " "

    @field_validator("pattern")
    @classmethod
    def _valid(cls, value: str) -> str:
        _compile(value)
        return value

    @property
    def regex(self) -> re.Pattern[str]:
        return _compile(self.pattern)


class AnswerSpec(PagerSpec):
    """A question asked during login (password expiry and the like), and the reply."""

    answer: Annotated[str, StringConstraints(max_length=64)] = ""


class EnableSpec(_Model):
    command: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    failed: list[Regex] = []


class Platform(_Model):
    """Everything the CLI driver needs to know about one vendor CLI."""

    name: str
    description: str = ""
    prompt: Regex
    privileged_prompt: Regex | None = None
    username_prompt: Regex
    password_prompt: Regex
    login_failed: list[Regex]
    login_answers: list[AnswerSpec] = []
    enable: EnableSpec | None = None
    paging_off: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = []
    pagers: list[PagerSpec] = []
    error_markers: list[Regex] = []
    username_suffix: Annotated[str, StringConstraints(max_length=32)] = ""
    return_char: Annotated[str, StringConstraints(min_length=1, max_length=2)] = "\n"
    exit_command: Annotated[str, StringConstraints(max_length=32)] = "exit"

    @field_validator("prompt", "privileged_prompt", "username_prompt", "password_prompt")
    @classmethod
    def _valid(cls, value: str | None) -> str | None:
        if value is not None:
            _compile(value)
        return value

    @field_validator("login_failed", "error_markers")
    @classmethod
    def _valid_list(cls, value: list[str]) -> list[str]:
        for pattern in value:
            _compile(pattern)
        return value

    def regex(self, pattern: str) -> re.Pattern[str]:
        return _compile(pattern)

    def any_of(self, patterns: list[str]) -> re.Pattern[str] | None:
        """One regex matching any of `patterns` (each line-anchored with MULTILINE)."""
        if not patterns:
            return None
        return re.compile("|".join(f"(?:{p})" for p in patterns), _FLAGS | re.MULTILINE)


class _File(_Model):
    defaults: dict[str, Any] = Field(default_factory=dict)
    platforms: dict[str, dict[str, Any]]


def parse_platforms(text: str, where: str = "platforms.yaml") -> dict[str, Platform]:
    """Validate a platforms document; raise ValueError naming the platform and field."""
    try:
        document = _File.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    out: dict[str, Platform] = {}
    for name, values in document.platforms.items():
        try:
            out[name] = Platform.model_validate({**document.defaults, **values, "name": name})
        except ValidationError as exc:
            raise ValueError(f"{where}: platform {name!r}: {exc}") from None
    return out


@cache
def load_platforms() -> dict[str, Platform]:
    """The platforms shipped with the poller (validated on first use)."""
    text = resources.files("poller.drivers").joinpath("platforms.yaml").read_text("utf-8")
    return parse_platforms(text)


def platform_names() -> list[str]:
    return sorted(load_platforms())
