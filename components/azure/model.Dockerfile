# syntax=docker/dockerfile:1
# One model version as the Azure IoT Edge module PneumoniaCXRModel (docs/azure-iot-edge.md): at start
# it copies its bundle into the shared volume as /models/<name>-<version> and stays up. A model update
# is a new image of this kind and a layered deployment; the runtime image is not rebuilt.
# Build from the repository root, after the runtime image (which verifies the bundle):
#   eval "$(python -m components.azure --print-images --registry REGISTRY)"
#   docker build -f components/azure/model.Dockerfile --build-arg RUNTIME_IMAGE="$RUNTIME_IMAGE" \
#     -t "$MODEL_IMAGE" .
# Another bundle: add --build-context bundle=PATH/TO/BUNDLE (it replaces the stage named bundle), and
# --build-arg TRUSTED_KEYS='["<PEM>"]' when your release key, not the project's, signed it.
ARG RUNTIME_IMAGE

# The bundle to ship: by default the one bundled with the runtime.
FROM scratch AS bundle
COPY edge_runtime/models/pneumonia-cxr/ /

# Verified by the runtime that will load it: every hash, the manifest's signature, the reference
# outputs on this build machine's CPU. Its folder name in the volume comes from its manifest.
FROM ${RUNTIME_IMAGE} AS verify
ARG TRUSTED_KEYS=""
COPY --from=bundle / /opt/model/bundle/
RUN if [ -n "$TRUSTED_KEYS" ]; then export EDGE_RUNTIME__MODEL__TRUSTED_KEYS="$TRUSTED_KEYS"; fi \
    && edge-runtime model verify /opt/model/bundle \
    && python -c "import json; m = json.load(open('/opt/model/bundle/manifest.json')); print(m['name'] + '-' + m['version'])" \
        > /tmp/bundle-folder-name

# A few MB of busybox, the bundle and the copy-then-wait script: nothing that runs Python.
FROM busybox:1.36.1
COPY --from=verify /opt/model/bundle/ /opt/model/bundle/
COPY --from=verify /tmp/bundle-folder-name /opt/model/NAME
COPY --chmod=0755 components/azure/model-entry.sh /usr/local/bin/model-entry.sh
# /models: the volume's mount point, owned by the uid both modules run as (the runtime image's).
RUN mkdir -p /models && chown 10001:10001 /models
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/model-entry.sh"]
