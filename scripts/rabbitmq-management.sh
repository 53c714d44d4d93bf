#!/usr/bin/env bash
# Enable the RabbitMQ management plugin (HTTP API used by `satellite provision|status|dlq`) and
# wait until it answers on 127.0.0.1:15672. Idempotent; expects the broker to be running.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
PORT=${RABBITMQ_MANAGEMENT_PORT:-15672}

answers() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" 2>/dev/null
}

if answers; then
    exit 0
fi
echo "rabbitmq: enabling the management plugin"
$SUDO timeout 120 rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null
for _ in $(seq 120); do
    if answers; then
        echo "rabbitmq: management API up on 127.0.0.1:$PORT"
        exit 0
    fi
    sleep 1
done
echo "rabbitmq: management API did not answer on 127.0.0.1:$PORT within 120 s" >&2
exit 1
