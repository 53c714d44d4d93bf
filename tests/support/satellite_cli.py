"""`satellite ARGS` run in the test's own process, and what a run printed.

`in_process(monkeypatch, capsys, dsn)` gives `run(*argv) -> Run`: `satellite.cli.main(argv)` with
`US_AMQP_DSN` set to `dsn` and no `USM_MANAGEMENT_URL` or `USM_TRUSTED_USERS` from the machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from satellite.cli import main

__all__ = ["Run", "in_process"]


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line]


def in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dsn: str
) -> Callable[..., Run]:
    monkeypatch.setenv("US_AMQP_DSN", dsn)
    monkeypatch.delenv("USM_MANAGEMENT_URL", raising=False)
    monkeypatch.delenv("USM_TRUSTED_USERS", raising=False)

    def run(*argv: str) -> Run:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run
