#!/usr/bin/env bash
# CI container tier: set up podman behind the `docker` CLI (scripts/container/setup.sh), then run
# the image under `docker compose` against the machine's RabbitMQ (scripts/container/e2e.py).
# Needs root, the project's .venv and RabbitMQ on 127.0.0.1:5672 (scripts/setup.sh makes both).
#
#   bash scripts/container/e2e.sh
#
# Cleans up what it started: the containers and the vhost (e2e.py), snmpd (e2e.py, by PID) and
# the podman API service when this run started it (teardown.sh, by PID). The base image, the
# built image's layers and the compose plugin stay cached under $USM_CONTAINER_DIR for the next
# run on this machine; `bash scripts/container/teardown.sh --all` removes them too.
set -euo pipefail
cd "$(dirname "$0")/../.."
t0=$SECONDS
trap 'bash scripts/container/teardown.sh' EXIT
bash scripts/container/setup.sh
# shellcheck source=env.sh
. scripts/container/env.sh
bash scripts/rabbitmq.sh
.venv/bin/python scripts/container/e2e.py
echo "container tier: passed in $((SECONDS - t0)) s (setup included)"
