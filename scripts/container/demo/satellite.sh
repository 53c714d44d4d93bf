#!/bin/sh
# The demo's core side (compose.demo.yaml): declare the satellite, then submit demo jobs with
# `satellite call` and print each result. Runs once in the poller image (which ships the
# `satellite` CLI too).
set -u
SAT=${USM_POLLER_SATELLITE_ID:-demo}
step() { printf '\n===== %s\n' "$*"; }

step "satellite declare $SAT"
# the pollers declare the same objects at start-up; declaring here too lets jobs queue up
# even before the first poller is consuming
for _ in 1 2 3 4 5 6 7 8 9 10; do satellite declare "$SAT" && break; sleep 3; done

step "snmp.get sysName.0, sysUpTime.0 and sysLocation.0 from snmp-agent"
satellite call "$SAT" snmp.get --host snmp-agent --community public \
    1.3.6.1.2.1.1.5.0 1.3.6.1.2.1.1.3.0 1.3.6.1.2.1.1.6.0

step "snmp.walk of the interface names (ifDescr, 1.3.6.1.2.1.2.2.1.2) of snmp-agent"
satellite call "$SAT" snmp.walk --host snmp-agent --community public 1.3.6.1.2.1.2.2.1.2

step "ssh.exec 'show version' and 'show interfaces status' on ssh-device"
USM_SSH_PASSWORD=admin satellite call "$SAT" ssh.exec --host ssh-device --port 2222 \
    --username admin --command 'show version' --command 'show interfaces status'

step "snmp.get from a host without an SNMP agent: an error result, not a crash"
satellite call "$SAT" snmp.get --host ssh-device --community public --job-timeout 5 \
    1.3.6.1.2.1.1.5.0

step "ten jobs at once: see which replica answered each"
i=0
while [ $i -lt 10 ]; do
    satellite call "$SAT" snmp.get --host snmp-agent --community public --json \
        1.3.6.1.2.1.1.5.0 &
    i=$((i + 1))
done | python3 -c 'import json, sys; [print(r.get("worker"), r.get("status"), r.get("duration_ms"), "ms") for r in map(json.loads, sys.stdin)]'
wait

step "done: the RabbitMQ console is at http://localhost:15672 (demo / demo)"
