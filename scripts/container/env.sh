# shellcheck shell=bash
# Source me: settings that make the `docker` CLI and `docker compose` talk to this project's
# rootful podman (see scripts/container/setup.sh). Nothing here touches /etc.
#   . scripts/container/env.sh
export USM_CONTAINER_DIR=${USM_CONTAINER_DIR:-/var/tmp/satellite-poller-podman}
export CONTAINERS_CONF=$USM_CONTAINER_DIR/containers.conf
export CONTAINERS_STORAGE_CONF=$USM_CONTAINER_DIR/storage.conf
export DOCKER_HOST=unix://$USM_CONTAINER_DIR/podman.sock
export DOCKER_CONFIG=$USM_CONTAINER_DIR/docker-config
# compose v2 would otherwise build with buildx/bake, which podman's API does not offer
export DOCKER_BUILDKIT=0 COMPOSE_BAKE=false
# keep HEALTHCHECK, STOPSIGNAL... in built images (the OCI image format has no HEALTHCHECK)
export BUILDAH_FORMAT=docker
