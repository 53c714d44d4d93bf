#!/usr/bin/env bash
# Run the whole test suite against real services (RabbitMQ, snmpd, sshd) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests  # and what only the tests need: chromium, axe-core
exec .venv/bin/python -m pytest "$@"
