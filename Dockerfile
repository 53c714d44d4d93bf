# The poller's container image (DESIGN §8): one `poller run` process per container, no port.
#
#   docker compose build            (tags satellite-poller:<version>, see compose.yaml)
#   docker build -t satellite-poller:0.1.0 .
#
# The default target (the last stage) is the poller's image. The target `core` is the core
# service's image, `satellite serve` with the package extra `core` (docs/core-service.md,
# "Deployment"); the poller's image never gets those dependencies:
#
#   docker build --target core -t satellite-core:0.1.0 .     (or: compose.core.yaml)
#
# VERSION must equal poller/__init__.py's __version__ (the build checks it); it is in the OCI
# labels and in compose.yaml's image tag.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# Stage 1: wheels of the project and of every dependency, and a virtualenv installed only from
# them. Nothing of this stage but the virtualenv reaches the image.
FROM ${PYTHON_IMAGE} AS build
ARG VERSION=0.1.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The dependencies first, from the project metadata alone: wheels, then a virtualenv installed
# from them. This layer is rebuilt only when pyproject.toml or the version changes, not on
# every code or README change.
COPY pyproject.toml ./
COPY poller/__init__.py poller/__init__.py
RUN touch README.md && mkdir satellite && touch satellite/__init__.py \
    && pip install -q hatchling \
    && pip wheel -q --no-build-isolation --wheel-dir /wheels . \
    && rm /wheels/satellite_poller-*.whl \
    && python -m venv /opt/poller \
    && /opt/poller/bin/pip install -q --no-index /wheels/*.whl
# Then the project's own wheel, installed into the same virtualenv from the wheels only.
COPY README.md ./
COPY poller poller
COPY satellite satellite
RUN pip wheel -q --no-build-isolation --no-deps --wheel-dir /wheels . \
    && /opt/poller/bin/pip install -q --no-index --find-links /wheels "satellite-poller==${VERSION}" \
       || { echo "Dockerfile VERSION=${VERSION} must equal poller/__init__.py's __version__" >&2; exit 1; }
RUN /opt/poller/bin/pip uninstall -y -q pip setuptools \
    && find /opt/poller -name '*.dist-info' -prune -o -type d -name tests -prune -exec rm -rf {} + \
    && /opt/poller/bin/poller --version && /opt/poller/bin/satellite --version

# ---------------------------------------------------------------------------------------------
# The core service (target `core`): the same two steps for `.[core]` into /opt/satellite, in
# stages of their own so that the poller's stages and image stay as they are (a build without
# --target skips these stages).
FROM ${PYTHON_IMAGE} AS core-build
ARG VERSION=0.1.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml ./
COPY poller/__init__.py poller/__init__.py
RUN touch README.md && mkdir satellite && touch satellite/__init__.py \
    && pip install -q hatchling \
    && pip wheel -q --no-build-isolation --wheel-dir /wheels '.[core]' \
    && rm /wheels/satellite_poller-*.whl \
    && python -m venv /opt/satellite \
    && /opt/satellite/bin/pip install -q --no-index /wheels/*.whl
# the project's own wheel, built once in the poller's build stage
COPY --from=build /wheels/satellite_poller-*.whl /wheels/
RUN /opt/satellite/bin/pip install -q --no-index --no-deps /wheels/satellite_poller-*.whl \
    && /opt/satellite/bin/pip check \
    && /opt/satellite/bin/pip uninstall -y -q pip setuptools \
    && find /opt/satellite -name '*.dist-info' -prune -o -type d -name tests -prune -exec rm -rf {} + \
    && /opt/satellite/bin/satellite --version \
    && /opt/satellite/bin/python -I -c 'import satellite.service.app'

FROM ${PYTHON_IMAGE} AS core
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="satellite-core" \
      org.opencontainers.image.description="The core service of satellite-poller: HTTP API, job history and result ingest (satellite serve)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# The state dir (the SQLite history when USM_CORE_DB is not set), the directory of the unix
# socket and of the tokens file: owned by the service's user, so that named volumes mounted
# there start with that owner.
RUN groupadd --gid 10001 satellite \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin satellite \
    && mkdir -p /var/lib/satellite /run/satellite /etc/satellite \
    && chown 10001:10001 /var/lib/satellite /run/satellite /etc/satellite
COPY --from=core-build /opt/satellite /opt/satellite
ENV PATH=/opt/satellite/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    USM_CORE_STATE_DIR=/var/lib/satellite \
    USM_CORE_LISTEN=unix:/run/satellite/api.sock,tcp:0.0.0.0:8480
WORKDIR /tmp
USER 10001:10001
EXPOSE 8480
# /readyz: 200 while the broker and the history store answer (no token needed)
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8480/readyz', timeout=4)"]
# SIGTERM: stop listening, finish the requests in flight, commit and ack what was ingested,
# exit 0 within 30 s.
STOPSIGNAL SIGTERM
CMD ["satellite", "serve"]

# ---------------------------------------------------------------------------------------------
# Stage 2: the runtime image of the poller (the default target).
FROM ${PYTHON_IMAGE} AS poller
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="satellite-poller" \
      org.opencontainers.image.description="Network polling worker for remote sites: takes jobs from the core's RabbitMQ, runs them against devices, publishes the results" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
RUN groupadd --gid 10001 poller \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin poller
# Net-SNMP's snmpbulkwalk/snmpwalk (Debian `snmp`): the netsnmp backend hands long walks to them
# (docs/drivers/snmp.md, "Walks through snmpbulkwalk"); without them walks run ~4-5x slower.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends snmp \
       > /dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && snmpbulkwalk -V && snmpwalk -V
COPY --from=build /opt/poller /opt/poller
# HOME and the state dir (USM_POLLER_STATE_DIR, default /tmp/usm-poller: the health file, the
# SSH trust-on-first-use file) live under /tmp, a tmpfs when the root is read-only (compose.yaml).
ENV PATH=/opt/poller/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /tmp
USER 10001:10001
# No EXPOSE: the poller connects out to the broker and listens on nothing.
# `poller check` reads the health file the worker rewrites every 2 s: exit 0 while it is
# connected and consuming.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["poller", "check"]
# SIGTERM: stop consuming, let running jobs finish within USM_POLLER_SHUTDOWN_GRACE (30 s),
# return the rest to the queue, exit 0. Give the container more than that to stop
# (compose.yaml: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["poller", "run"]
