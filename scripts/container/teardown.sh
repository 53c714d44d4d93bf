#!/usr/bin/env bash
# Undo what scripts/container/setup.sh started: the podman API service, by the PID it recorded,
# when setup.sh started it in this round (the line `started-service` in setup.out).
#
#   bash scripts/container/teardown.sh          # stop the service; keep images and caches
#   bash scripts/container/teardown.sh --all    # also remove every container, image and cache
#
# --all removes $USM_CONTAINER_DIR (the base image, the layers, the compose plugin): the next
# setup.sh starts from scratch (about 2 minutes). Outside $USM_CONTAINER_DIR, --all removes only
# /var/lib/containers (podman's small blob cache), and only when setup.sh found it absent.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
. "$HERE/env.sh"
D=$USM_CONTAINER_DIR
[ -d "$D" ] || exit 0

if [ "${1:-}" = --all ] && [ -f "$CONTAINERS_CONF" ]; then
    docker version > /dev/null 2>&1 || true
    podman rm -a -f -t 2 > /dev/null 2>&1
    podman pod rm -a -f > /dev/null 2>&1
    podman rmi -a -f > /dev/null 2>&1
fi

stop_service() {
    local pid
    pid=$(cat "$D/service.pid" 2>/dev/null) || return 0
    [ -n "$pid" ] || return 0
    # only if that PID is still our podman service (PIDs are reused)
    if grep -q "podman.*system.*service.*$D/podman.sock" "/proc/$pid/cmdline" 2>/dev/null ||
        tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "system service.*$D/podman.sock"; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$D/service.pid" "$D/podman.sock"
}
if [ "${1:-}" = --all ] || grep -q '^started-service$' "$D/setup.out" 2>/dev/null; then
    stop_service
    : > "$D/setup.out"
fi

if [ "${1:-}" = --all ]; then
    # overlay mounts of stopped containers are gone with `podman rm`; storage can go now
    podman system reset --force > /dev/null 2>&1 || true
    [ -e "$D/created-var-lib-containers" ] && rm -rf /var/lib/containers
    rm -rf "$D"
fi
exit 0
