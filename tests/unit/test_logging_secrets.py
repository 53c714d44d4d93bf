"""The service's log never carries a secret that an HTTP library put in a URL.

Telegram's bot API puts the bot token in the path (`/bot<token>/sendMessage`), and httpx logs
every request's URL at level info ("HTTP Request: POST ..."). `configure_logging` must keep
those lines out at every level the service logs at.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from poller import logging as plog
from tests.support.receiver import Receiver
from tests.unit.test_logging import restore_logging

__all__ = ["restore_logging"]  # the fixture, imported to be used here

SECRET = "123456:SECRET-bot-token"


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["debug", "info", "warning"])
def test_a_bot_token_in_a_request_url_is_not_logged(tmp_path: Path, level: str) -> None:
    path = tmp_path / "log.jsonl"

    async def send() -> int:
        async with Receiver([(200, {"ok": True})]) as bot, httpx.AsyncClient(timeout=5) as client:
            answer = await client.post(f"{bot.url}/bot{SECRET}/sendMessage", json={})
            return answer.status_code

    with path.open("w", encoding="utf-8") as out:
        plog.configure_logging("json", level, out)
        plog.get_logger("test.secrets").warning("before")
        assert asyncio.run(send()) == 200
        plog.get_logger("test.secrets").warning("after")
    text = path.read_text(encoding="utf-8")
    assert '"event":"before"' in text
    assert '"event":"after"' in text
    assert SECRET not in text
    assert "SECRET" not in text
