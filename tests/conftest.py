"""Session fixtures: real services on loopback (RabbitMQ vhost per run, snmpd, sshd)."""

from __future__ import annotations

from tests.support.database import db_url, pg_database  # noqa: F401 - history-store databases
from tests.support.lane import replies, slow_devices  # noqa: F401 - the interactive lane's
from tests.support.management import management_api, provision  # noqa: F401
from tests.support.netns import blackhole_netns  # noqa: F401 - a namespace with a black hole
from tests.support.poller_proc import client, sid, silent_udp_port, start_poller  # noqa: F401
from tests.support.rabbitmq import amqp_vhost, satellite_queues_cleaned  # noqa: F401
from tests.support.rabbitmq_cluster import cluster, rabbitmq_cluster  # noqa: F401
from tests.support.snmpd import snmpd  # noqa: F401
from tests.support.sshd import sshd_server  # noqa: F401 - session fixture: OpenSSH sshd
from tests.support.tls_broker import tls_broker  # noqa: F401
