"""This replica's reply queue: results of the jobs its callers wait for, straight from pollers.

A job submitted with `Prefer: wait` carries `reply_to = usm_poller.core-reply.<replica>`; the
poller publishes its result as `reply.<satellite>.<that queue>`, which this queue (bound with
`reply.*.<queue>`) and the history (bound with `reply.#`) both receive. The copy here only wakes
the waiting caller; the history's copy is the one that is stored. So the queue is consumed
without acks (`auto_ack`): a copy lost with its replica loses nothing (the caller that waited
for it is gone too), and no ack goes back to the broker per reply. The same connection
publishes the service's jobs (with confirms), each sent in the call that publishes it
(`write_through`: no loop turn between the `queued` commit and the job's send()).
"""

from __future__ import annotations

import dataclasses

from poller import wire
from poller.broker import Broker, BrokerOptions, Delivery, QueueSpec, Topology
from poller.config import AmqpUrl
from poller.errors import WireError
from poller.logging import get_logger
from satellite.service.jobs import Waiters

__all__ = ["Replies", "reply_topology"]

log = get_logger("satellite.service.replies")


def reply_topology(queue: str) -> Topology:
    results = wire.results_exchange()
    return Topology(
        exchanges=((wire.jobs_exchange(), "direct"), (results, "topic")),
        queues=(
            QueueSpec(
                queue,
                wire.core_reply_queue_arguments(),
                ((results, wire.reply_binding_key(queue)),),
            ),
        ),
    )


class Replies:
    """Consumes the reply queue into `Waiters`; its broker also publishes jobs."""

    def __init__(
        self, urls: list[AmqpUrl], options: BrokerOptions, *, replica: str, waiters: Waiters
    ) -> None:
        self.queue = wire.core_reply_queue(replica)
        self.waiters = waiters
        self.broker = Broker(
            urls,
            dataclasses.replace(options, auto_ack=True, write_through=True),
            queue=self.queue,
            topology=reply_topology(self.queue),
            on_delivery=self._on_delivery,
        )

    def _on_delivery(self, delivery: Delivery) -> None:
        try:
            result = wire.decode_result(delivery.body)
        except WireError as exc:
            log.warning("reply_malformed", reason=str(exc)[:300])
        else:
            self.waiters.notify([result])
