"""Session fixtures: real services on loopback (RabbitMQ vhost per run, snmpd, sshd)."""

from __future__ import annotations

from tests.support.poller_proc import start_poller  # noqa: F401
from tests.support.rabbitmq import amqp_vhost  # noqa: F401
from tests.support.snmpd import snmpd  # noqa: F401
