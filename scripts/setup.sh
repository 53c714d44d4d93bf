#!/usr/bin/env bash
# Prepare this machine for the demo and the tests (Debian, run as root or with sudo):
# Debian packages (Net-SNMP, OpenSSH server, RabbitMQ if absent), a virtualenv in .venv with the
# project and its dev extras, a running RabbitMQ at 127.0.0.1:5672 and (when installed) PostgreSQL
# at 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
PYTHON=${PYTHON:-python3}

apt_packages=(snmpd snmp openssh-server iproute2 curl)
# With --tests (scripts/test.sh, CI): what only the tests need. The fleet page's browser test
# drives Debian's chromium (Playwright never downloads a browser); npm fetches axe-core for its
# accessibility pass (below).
TESTS=0; [ "${1:-}" = --tests ] && TESTS=1
if [ "$TESTS" = 1 ]; then
    apt_packages+=(chromium)
    # tests/faults/test_network.py: partitions and packet loss with iptables in namespaces of
    # the test (this kernel has no netem).
    apt_packages+=(iptables)
    command -v npm >/dev/null 2>&1 || apt_packages+=(npm)
fi
command -v rabbitmq-server >/dev/null 2>&1 || apt_packages+=(rabbitmq-server)
# Debian's own python3 needs python3-venv for `python3 -m venv` (pyenv builds have it).
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_packages+=(python3-venv)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
# Debian's snmpd package starts a system agent on port 161; the demo and tests run their own.

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import poller, satellite' >/dev/null

# axe-core for tests/integration/test_fleet_browser.py (injected into the pages it checks).
AXE_VERSION=4.14.1
if [ "$TESTS" = 1 ] && [ ! -f ".cache/axe-core/$AXE_VERSION/axe.min.js" ]; then
    mkdir -p ".cache/axe-core/$AXE_VERSION"
    (cd ".cache/axe-core/$AXE_VERSION" && npm pack -q "axe-core@$AXE_VERSION" >/dev/null \
        && tar -xzf "axe-core-$AXE_VERSION.tgz" --strip-components=1 package/axe.min.js \
        && rm "axe-core-$AXE_VERSION.tgz")
fi

bash scripts/rabbitmq.sh
bash scripts/rabbitmq-management.sh
bash scripts/postgres.sh
