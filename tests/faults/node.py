"""The one private RabbitMQ node that scenarios 4, 8 and 9 of issue 17 share.

Scenario 4 SIGKILLs a broker node and starts it again; 8 raises a memory alarm; 9 sets a short
`consumer_timeout`. All three act on a whole node, so none may run on the machine's broker that
other tests share, and a node start costs 5-20 s on this machine: one lone node
(`private_broker(1)` of tests/support/rabbitmq_cluster.py) serves the three of them, started
once for the `tests/faults` package (fixture `fault_node` in conftest.py) and reset between the
scenarios: started again if a scenario left it killed, its memory watermark and consumer
timeout set back to their defaults if a scenario changed them. Each scenario has a satellite
id (queues) of its own on the node's default vhost.

The node checks consumer timeouts every second (`channel_tick_interval`; 60 s by default, which
would make any timeout below a minute act a minute late).
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.support.rabbitmq import AmqpVhost
from tests.support.rabbitmq_cluster import Cluster, ClusterNode

__all__ = [
    "ADVANCED",
    "DEFAULT_CONSUMER_TIMEOUT_MS",
    "NORMAL_WATERMARK",
    "FaultNode",
]

#: The node's `advanced.config`: consumer timeouts checked every second.
ADVANCED = "[{rabbit, [{channel_tick_interval, 1000}]}]."
#: `consumer_timeout` as RabbitMQ ships it (30 min).
DEFAULT_CONSUMER_TIMEOUT_MS = 1_800_000
#: The memory high watermark as RabbitMQ ships it.
NORMAL_WATERMARK = 0.4


@dataclass
class FaultNode:
    """The shared node: what the scenarios do to it, and the reset between them."""

    broker: Cluster
    #: Whether a scenario changed a runtime setting (`eval`) since the last reset or start.
    changed: bool = False

    @property
    def node(self) -> ClusterNode:
        return self.broker.node(1)

    def url(self, vhost: str = "/") -> str:
        return self.node.url(vhost)

    @property
    def vhost(self) -> AmqpVhost:
        """The default vhost, for `PollerFactory` and the fault harness."""
        return self.node.vhost

    def eval(self, *expressions: str) -> str:
        """`rabbitmqctl eval` of the expressions, in one call (each call starts an Erlang VM:
        seconds on a loaded machine)."""
        self.changed = True
        joined = ", ".join(e.rstrip(".") for e in expressions) + "."
        return self.broker.rabbitmqctl("eval", joined, node=1)

    @staticmethod
    def set_env(key: str, value: int | str) -> str:
        """The expression that sets `rabbit`'s KEY at runtime (channels opened later read it)."""
        return f"application:set_env(rabbit, {key}, {value})"

    @staticmethod
    def watermark(fraction: float) -> str:
        """The expression that sets the memory high watermark (near 0: a memory alarm)."""
        return f"vm_memory_monitor:set_vm_memory_high_watermark({fraction})"

    def kill(self) -> None:
        """SIGKILL the node, as a crash would."""
        self.broker.kill(1)

    def start(self) -> None:
        """Start the node again (its runtime settings are the configured ones again)."""
        self.broker.start(1)
        self.changed = False

    def reset(self) -> None:
        """Running, with the default watermark and consumer timeout."""
        if self.broker.killed:
            self.start()
        if self.changed:
            self.eval(
                self.watermark(NORMAL_WATERMARK),
                self.set_env("consumer_timeout", DEFAULT_CONSUMER_TIMEOUT_MS),
            )
            self.changed = False

    def log_text(self) -> str:
        return self.broker.log_text(1)
