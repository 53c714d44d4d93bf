#!/usr/bin/env bash
# Run the whole test suite against real services (RabbitMQ, snmpd, sshd) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests  # and what only the tests need: chromium, axe-core
# The project's bytecode, written once here: CI runs with PYTHONDONTWRITEBYTECODE=1, so each of
# the hundreds of `poller run` and `satellite` processes the tests start would compile the
# modules it imports again (0.1-0.2 s each). Python checks each file's mtime and size, so a
# stale one is never used; __pycache__ is ignored by git and by the image's build context.
.venv/bin/python -m compileall -q -j 0 poller satellite tests
exec .venv/bin/python -m pytest "$@"
