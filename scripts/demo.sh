#!/usr/bin/env bash
# One demo round on this machine: a real Net-SNMP agent on loopback, one `poller run` consuming
# satellite "demo" from the local RabbitMQ, and the core's `satellite call` asking it for SNMP data.
#
#   bash scripts/demo.sh            # sets up what is missing, runs the round, cleans up
#
# Everything it starts (snmpd, the poller) is stopped by PID at the end; state is in .demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

DEMO=$PWD/.demo
PORT=${DEMO_SNMP_PORT:-16161}
export US_AMQP_DSN=${US_AMQP_DSN:-amqp://guest:guest@127.0.0.1:5672/%2F}
export USM_POLLER_SATELLITE_ID=${USM_POLLER_SATELLITE_ID:-demo}
export USM_POLLER_STATE_DIR=$DEMO/state USM_POLLER_LOG_FORMAT=json MIBS=:
SID=$USM_POLLER_SATELLITE_ID
rm -rf "$DEMO"; mkdir -p "$DEMO/snmpd" "$DEMO/state"
chmod 755 "$DEMO"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}
trap cleanup EXIT

cat > "$DEMO/snmpd/snmpd.conf" <<CONF
agentAddress udp:127.0.0.1:$PORT
rocommunity public 127.0.0.1
sysName demo-switch-1
sysLocation demo rack 1
createUser demo SHA-256 "demo-auth-key" AES "demo-priv-key"
rouser demo priv
CONF
chown -R nobody:nogroup "$DEMO/snmpd"
SNMPD=$(command -v snmpd || echo /usr/sbin/snmpd)
"$SNMPD" -f -Lf "$DEMO/snmpd/snmpd.log" -I -smux -C -c "$DEMO/snmpd/snmpd.conf" \
    -u nobody -g nogroup -p "$DEMO/snmpd/pid" < /dev/null &
pids+=($!)

echo "== declaring satellite $SID on the broker"
.venv/bin/satellite declare "$SID"

echo "== starting poller run (log: .demo/poller.log)"
.venv/bin/poller run > "$DEMO/poller.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do .venv/bin/poller check -q && break; sleep 0.2; done
.venv/bin/poller check

echo "== satellite call $SID snmp.get (v2c): sysName, sysUpTime, sysLocation"
.venv/bin/satellite call "$SID" snmp.get --host 127.0.0.1 --port "$PORT" --community public \
    1.3.6.1.2.1.1.5.0 1.3.6.1.2.1.1.3.0 1.3.6.1.2.1.1.6.0

WALK_MAX=8
echo "== satellite call $SID snmp.walk (SNMPv3 authPriv SHA256/AES) of the system group"
echo "   (--max-varbinds $WALK_MAX keeps this short: the walk stops after $WALK_MAX varbinds, before"
echo "    the end of the group, and the result says so with \"truncated\": true; without the"
echo "    option a walk returns up to 200000 varbinds and \"truncated\": false when complete)"
.venv/bin/satellite call "$SID" snmp.walk --host 127.0.0.1 --port "$PORT" --snmp-version 3 \
    --user demo --auth-protocol SHA256 --auth-key demo-auth-key --priv-protocol AES \
    --priv-key demo-priv-key --max-varbinds "$WALK_MAX" 1.3.6.1.2.1.1

echo "== satellite call $SID snmp.get against a port where nothing answers (a device failure)"
.venv/bin/satellite call "$SID" snmp.get --host 127.0.0.1 --port 9 --community public \
    --job-timeout 2 1.3.6.1.2.1.1.5.0 || echo "(exit code $?: the job's status is error)"

echo "== the poller's log lines for these jobs"
grep '"job_finished"' "$DEMO/poller.log" || true
