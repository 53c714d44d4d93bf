"""One log line per request, `request_finished`: method, path, status, duration, caller.

A plain ASGI middleware (no body buffering). The query string is left out (it may name hosts
an operator searched for, which is fine, but keep lines short) and so is every header: tokens
never reach a log. The caller is the token's name or `unix-socket`, once auth has run (also
when the token lacked the route's scope: a 403).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from poller.logging import get_logger

__all__ = ["AccessLog"]

log = get_logger("satellite.service.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # until the app says otherwise (an exception before the response)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state: Any = scope.get("state") or {}
            principal = state.get("principal") if isinstance(state, dict) else None
            refused = state.get("caller") if isinstance(state, dict) else None
            log.info(
                "request_finished",
                method=scope.get("method"),
                path=str(scope.get("path", ""))[:300],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                caller=getattr(principal, "name", None) or refused,
            )
