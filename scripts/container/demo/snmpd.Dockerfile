# The demo's SNMP agent (compose.demo.yaml): Debian's Net-SNMP snmpd answering v2c `public`.
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends snmpd \
    && rm -rf /var/lib/apt/lists/*
COPY snmpd.conf /etc/snmp/demo.conf
# binds udp/161, then drops to the Debian-snmp user; -C: only this configuration
CMD ["snmpd", "-f", "-Lo", "-I", "-smux", "-C", "-c", "/etc/snmp/demo.conf", "-u", "Debian-snmp", "-g", "Debian-snmp"]
