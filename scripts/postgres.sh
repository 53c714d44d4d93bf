#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 for the history-store tests of
# `satellite serve` (user postgres, trust auth on loopback); start the local cluster if it does
# not. Without PostgreSQL those tests skip locally and fail in CI (tests/support/database.py).
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

answers() {
    timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5432' 2>/dev/null
}

if answers; then
    exit 0
fi
if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ ! -d /etc/postgresql ]; then
    echo "postgres: no PostgreSQL server installed (apt-get install postgresql); its tests will skip, or fail in CI" >&2
    exit 0
fi
version=$(ls /etc/postgresql | sort -V | tail -1)
echo "postgres: not answering on 127.0.0.1:5432, starting cluster $version/main"
$SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
for _ in $(seq 60); do
    if answers; then
        echo "postgres: up"
        exit 0
    fi
    sleep 1
done
echo "postgres: did not start within 60 s" >&2
exit 1
