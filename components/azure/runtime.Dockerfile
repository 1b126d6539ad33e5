# syntax=docker/dockerfile:1
# The edge runtime as the Azure IoT Edge module HealthDiagEdgeInference (docs/azure-iot-edge.md).
# Build from the repository root; runtime.Dockerfile.dockerignore beside this file keeps the context to
# what the wheel needs (BuildKit reads it; the legacy builder sends the whole checkout):
#   eval "$(python -m components.azure --print-images --registry REGISTRY)"
#   docker build -f components/azure/runtime.Dockerfile -t "$RUNTIME_IMAGE" .
# The runtime reads its configuration from its module twin (the deployment manifest sets it); the
# model comes from the model module's volume, so a new model never needs a new runtime image.

# Builder: wheels of the project and of every dependency, binary wheels only (no compiler needed in
# either stage), then a virtual environment installed from them alone. The azure extra pins
# azure-iot-device 2.15.0rc1: the first release that runs on paho-mqtt 2, which the runtime uses.
FROM python:3.11-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_runtime/ edge_runtime/
RUN pip wheel --no-cache-dir --only-binary=:all: --wheel-dir /wheels '.[azure]' \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels 'healthdiag-edge[azure]'

# Runtime: the same base, the virtual environment copied in; no pip cache, no wheels, no build tools.
FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# uid/gid 10001: the host folder mounted at /var/lib/healthdiag must belong to it. /models is the
# model volume's mount point; owned by the same uid so a volume Docker creates from it is writable by
# the model module (same uid) and read-only here (the manifest mounts it :ro).
RUN groupadd --system --gid 10001 healthdiag \
    && useradd --system --uid 10001 --gid healthdiag --no-create-home --home-dir /var/lib/healthdiag \
        --shell /usr/sbin/nologin healthdiag \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/healthdiag \
    && install -d -o 10001 -g 10001 -m 0755 /models
COPY --from=builder /opt/venv /opt/venv
COPY components/azure/healthcheck.yaml /etc/healthdiag/healthcheck.yaml
USER 10001:10001
WORKDIR /var/lib/healthdiag
# The bundled model, verified with the engines just installed (hashes, signature, reference outputs on
# this build machine's CPU): an image whose dependencies drifted from the tested ones fails here,
# before it is pushed.
RUN edge-runtime model verify
# Healthy while the service rewrites its health file (Health.File in the twin; healthcheck.yaml must
# name the same file). IoT Edge shows the state; restartPolicy on-unhealthy would act on it.
HEALTHCHECK --interval=60s --timeout=15s --start-period=180s --retries=3 \
    CMD ["edge-runtime", "health", "-c", "/etc/healthdiag/healthcheck.yaml"]
ENTRYPOINT ["edge-runtime", "run"]
