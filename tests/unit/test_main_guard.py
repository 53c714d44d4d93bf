"""`python -m satellite.cli` / `python -m poller.cli` run `main()` only after every function of
the module is defined: the `if __name__ == "__main__"` guard is the module's last statement
(twice a command block landed below it, and the command line died with NameError)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


@pytest.mark.parametrize("module", ["satellite/cli.py", "poller/cli.py"])
def test_the_main_guard_is_the_last_statement(module: str) -> None:
    body = ast.parse((ROOT / module).read_text(encoding="utf-8")).body
    guards = [n for n, node in enumerate(body) if _is_main_guard(node)]
    assert guards in ([], [len(body) - 1]), f"{module}: the __main__ guard must come last"
