#!/usr/bin/env bash
# One demo round on this machine: a real Net-SNMP agent on loopback, one `poller run` consuming
# satellite "demo" from the local RabbitMQ, the core's `satellite call` asking it for SNMP data,
# and the core service `satellite serve` (its history in SQLite under .demo/core/) taking a job
# over HTTP on its unix socket and finding it again in the history.
#
#   bash scripts/demo.sh            # sets up what is missing, runs the round, cleans up
#
# Everything it starts (snmpd, the poller, satellite serve) is stopped by PID at the end; state
# and logs are in .demo/. DEMO_SNMP_PORT (16161) and DEMO_API_PORT (18480) move its ports,
# DEMO_DIR its state (tests/integration/test_demo.py; DEMO_SETUP=0 skips scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${DEMO_SETUP:-1}" = 0 ] || bash scripts/setup.sh

DEMO=${DEMO_DIR:-$PWD/.demo}
PORT=${DEMO_SNMP_PORT:-16161}
API_PORT=${DEMO_API_PORT:-18480}
SOCK=$DEMO/core/api.sock
export US_AMQP_DSN=${US_AMQP_DSN:-amqp://guest:guest@127.0.0.1:5672/%2F}
export USM_POLLER_SATELLITE_ID=${USM_POLLER_SATELLITE_ID:-demo}
export USM_POLLER_STATE_DIR=$DEMO/state USM_POLLER_LOG_FORMAT=json MIBS=:
SID=$USM_POLLER_SATELLITE_ID
rm -rf "$DEMO"; mkdir -p "$DEMO/snmpd" "$DEMO/state" "$DEMO/core"
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
# Exit 1 means some queue exists with other arguments, e.g. the classic dead-letter queue of an
# earlier version's demo: the poller consumes the queues as they are (docs/operations.md,
# "Classic dead-letter queues", says how to migrate). Anything else stops the demo.
rc=0; .venv/bin/satellite declare "$SID" || rc=$?
if [ "$rc" = 1 ]; then
    echo "   (queues from an earlier version are kept as they are; the demo goes on with them)"
elif [ "$rc" != 0 ]; then
    exit "$rc"
fi

echo "== starting poller run (log: .demo/poller.log)"
.venv/bin/poller run > "$DEMO/poller.log" 2>&1 &
pids+=($!)

# The core service on its embedded default store: SQLite (WAL) in its state dir, here .demo/core/.
# It listens on a unix socket (trusted: its file mode 0660 is the access control) and on loopback
# TCP (a bearer token needed; this one may only read). docs/core-service.md has the rest.
export USM_CORE_STATE_DIR=$DEMO/core USM_CORE_LOG_FORMAT=json
export USM_CORE_LISTEN=unix:$SOCK,tcp:127.0.0.1:$API_PORT
TOKEN=$(.venv/bin/satellite token create demo-reader --scope read)
echo "== starting satellite serve (history: .demo/core/history.sqlite3, log: .demo/serve.log)"
echo "   listening on unix:.demo/core/api.sock and tcp:127.0.0.1:$API_PORT"
.venv/bin/satellite serve > "$DEMO/serve.log" 2>&1 &
pids+=($!)

for _ in $(seq 100); do .venv/bin/poller check -q && break; sleep 0.2; done
.venv/bin/poller check
ready() { curl -sf --max-time 2 --unix-socket "$SOCK" http://localhost/readyz > /dev/null; }
for _ in $(seq 150); do ready && break; sleep 0.2; done
ready || { echo "satellite serve is not ready; .demo/serve.log:" >&2; tail -20 "$DEMO/serve.log" >&2; exit 1; }

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

JOB='{"kind": "snmp.get", "target": {"host": "127.0.0.1", "port": '"$PORT"'},
     "auth": {"version": "2c", "community": "public"}, "params": {"oids": ["1.3.6.1.2.1.1.5.0"]}}'
echo "== HTTP over the unix socket: POST /v1/satellites/$SID/jobs with Prefer: wait=10"
echo "   curl --unix-socket .demo/core/api.sock -X POST http://localhost/v1/satellites/$SID/jobs \\"
echo "        -H 'Prefer: wait=10' -H 'Content-Type: application/json' -d '$(echo $JOB)'"
RECORD=$(curl -sS --max-time 20 --unix-socket "$SOCK" -X POST "http://localhost/v1/satellites/$SID/jobs" \
    -H 'Prefer: wait=10' -H 'Content-Type: application/json' -d "$JOB" -w '\n%{http_code}')
CODE=${RECORD##*$'\n'}; RECORD=${RECORD%$'\n'*}
echo "   HTTP $CODE (200: the result came back within the wait; 202: not yet, follow Location)"
echo "$RECORD" | .venv/bin/python -m json.tool
JOB_ID=$(echo "$RECORD" | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["id"])')

history() {  # GET /v1/jobs?QUERY over the unix socket, as a table
    curl -sS --max-time 5 --unix-socket "$SOCK" "http://localhost/v1/jobs?$1" | .venv/bin/python -c '
import json, sys
rows = [("id", "source", "kind", "host", "port", "status", "error_code")]
for j in json.load(sys.stdin)["items"]:
    rows.append((j["id"], j["source"], j["kind"], j["host"] or "-", j["port"] or "-", j["status"],
                 j["error_code"] or "-"))
for row in rows:
    print("   %-36s  %-6s  %-9s  %-9s  %-5s  %-6s  %s" % row)'
}
# The reply reached the waiting request directly; the history row is written by the ingest a
# moment later (its group commit): wait for it, as a client reading its own write would.
curl -sS --max-time 10 --unix-socket "$SOCK" "http://localhost/v1/jobs/$JOB_ID?wait=5" >/dev/null
echo "== the history, found again: GET /v1/jobs?host=127.0.0.1 over the unix socket (newest first)"
echo "   curl --unix-socket .demo/core/api.sock 'http://localhost/v1/jobs?host=127.0.0.1'"
history "host=127.0.0.1"
echo "== the history of satellite $SID: GET /v1/jobs?satellite=$SID"
echo "   (the jobs of satellite call above are there too, source cli: the service archives every"
echo "    result published on the broker, whoever sent the job (another core's: source amqp);"
echo "    a result does not carry the job's target, so their host is unknown)"
for _ in $(seq 20); do  # they are written in group commits (50 ms): normally there already
    [ "$(history "satellite=$SID" | wc -l)" -ge 5 ] && break
    sleep 0.1
done
history "satellite=$SID"

echo "== the same job over TCP with the read-only token: GET /v1/jobs/$JOB_ID"
curl -sS --max-time 5 -H "Authorization: Bearer $TOKEN" \
    "http://127.0.0.1:$API_PORT/v1/jobs/$JOB_ID" \
    | .venv/bin/python -c 'import json, sys; j = json.load(sys.stdin); print("  ", j["status"], j["result"]["data"]["varbinds"][0]["value"])'
echo "   (without the token: HTTP $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
    "http://127.0.0.1:$API_PORT/v1/jobs/$JOB_ID"))"

echo "== the poller's log lines for these jobs"
grep '"job_finished"' "$DEMO/poller.log" || true
