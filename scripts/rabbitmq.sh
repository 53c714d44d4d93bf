#!/usr/bin/env bash
# Make sure the local RabbitMQ answers on 127.0.0.1:5672; start it if it does not.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

answers() {
    timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' 2>/dev/null
}

if answers; then
    exit 0
fi
echo "rabbitmq: not answering on 127.0.0.1:5672, starting it"
$SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 120); do
    if answers && $SUDO timeout 10 rabbitmqctl -q await_startup >/dev/null 2>&1; then
        echo "rabbitmq: up"
        exit 0
    fi
    sleep 1
done
echo "rabbitmq: did not start within 120 s" >&2
exit 1
