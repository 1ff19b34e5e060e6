# syntax=docker/dockerfile:1
#
# backpack-vault: one image for the daemon (`serve`, the default), `vault setup`, `keys ...`,
# and the sandbox exchange (`sandbox --listen 0.0.0.0:8300`).
#
#   docker build -t backpack-vault .
#   docker run --rm -e VAULT_ADDR=... -e VAULT_TOKEN=... -p 8280:8280 backpack-vault
#
# The builder turns the project and its dependencies into wheels; the runtime stage installs
# only those wheels (no compiler, no build tools, no source tree) and runs as a non-root user.
# The embedded dev mode (`backpack-vault dev`, with its own OpenBao) is not in this image.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="backpack-vault" \
      org.opencontainers.image.description="Backpack Exchange API keys in Vault, handed to trading bots under Vault policy" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BACKPACK_VAULT_LISTEN=0.0.0.0:8280 \
    BACKPACK_VAULT_LOG_FORMAT=json
# A fixed numeric uid/gid so that Kubernetes' runAsNonRoot can verify it; no home, no shell.
RUN groupadd --system --gid 10001 backpack \
    && useradd --system --uid 10001 --gid backpack --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin backpack
# Only wheels enter this stage, through a bind mount: none of them stays in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/backpack_vault-*.whl
USER 10001:10001
WORKDIR /tmp
EXPOSE 8280
# Liveness of the daemon with the standard library only (the image has no curl). Services
# that run other commands from this image (sandbox, setup) override or disable it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('BACKPACK_VAULT_LISTEN', '0.0.0.0:8280').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
# Exec form: the Python process is PID 1's only child and receives SIGTERM itself, so the
# daemon drains in-flight requests and stops its scheduler before exiting.
STOPSIGNAL SIGTERM
ENTRYPOINT ["backpack-vault"]
CMD ["serve"]
