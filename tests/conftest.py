"""Session fixtures: real services on loopback (RabbitMQ vhost per run, snmpd, sshd)."""

from __future__ import annotations
