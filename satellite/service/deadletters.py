"""A satellite's dead-letter queue through the service: list, replay, purge.

The `satellite` toolkit's own DLQ code (`satellite.client`, `satellite.dlq`, kombu) run in a
worker thread, one short connection per request (DESIGN §14 allows kombu in a thread for the
service): these are operator actions, not the hot path, and the CLI's tested behaviour (confirm
then ack on replay, secrets masked) comes with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from poller.errors import BrokerError
from satellite.client import Client
from satellite.config import CoreSettings as BrokerSettings
from satellite.topology import NotDeclaredError

__all__ = ["DeadLetterError", "DeadLetters"]

T = TypeVar("T")

#: Longest a DLQ request may take (connecting, reading up to the listing limit, replaying).
REQUEST_TIMEOUT = 60.0


class DeadLetterError(Exception):
    """`status` 404: the satellite has no DLQ; 503: the broker cannot be reached."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class DeadLetters:
    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings

    async def list(self, satellite_id: str) -> list[dict[str, Any]]:
        """Every dead letter's summary (no body; the letters stay in the DLQ)."""
        letters = await self._run(satellite_id, lambda c: c.dead_letters(satellite_id))
        return [letter.summary() for letter in letters]

    async def replay(self, satellite_id: str, job_ids: Collection[str] | None) -> dict[str, Any]:
        """Move the chosen (None: all) dead letters back to the job queue; the report."""
        report = await self._run(satellite_id, lambda c: c.replay(satellite_id, job_ids))
        return report.as_dict()

    async def purge(self, satellite_id: str) -> int:
        return await self._run(satellite_id, lambda c: c.purge_dead_letters(satellite_id))

    async def _run(self, satellite_id: str, call: Callable[[Client], T]) -> T:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await asyncio.to_thread(self._sync, call)
        except TimeoutError:
            raise DeadLetterError(
                503, "broker_unavailable", f"no answer from the broker in {REQUEST_TIMEOUT:g} s"
            ) from None
        except NotDeclaredError as exc:
            raise DeadLetterError(404, "unknown_satellite", str(exc)) from None
        except BrokerError as exc:
            raise DeadLetterError(503, "broker_unavailable", str(exc)) from None
        except Exception as exc:
            if getattr(exc, "code", None) == 404:  # the broker's NOT_FOUND: no such queue
                raise DeadLetterError(
                    404,
                    "unknown_satellite",
                    f"satellite {satellite_id!r} has no dead-letter queue (declare it first)",
                ) from None
            raise

    def _sync(self, call: Callable[[Client], T]) -> T:
        with Client(self.settings) as client:
            return call(client)
