#!/usr/bin/env bash
# The separate virtual environment for the TFLite (LiteRT) INT8 export, and the export itself.
#
# litert-torch and ai-edge-quantizer pin versions that conflict with the main environment
# (they downgrade pydantic and typing_extensions, which the edge runtime needs), so they live
# in their own venv, .venv-tflite/ at the repository root (git-ignored). Nothing here touches
# the main environment. The edge runtime only needs ai-edge-litert to RUN the .tflite file.
#
# Usage (from anywhere; paths are relative to the repository root):
#   training/tflite_env.sh setup                 # create/refresh .venv-tflite (~1.5 min, pip cache warm)
#   training/tflite_env.sh export [ARGS...]      # python -m training.export.tflite_export ARGS in the venv
#   training/tflite_env.sh python [ARGS...]      # the venv's python (e.g. for a quick check)
#   training/tflite_env.sh all [ARGS...]         # setup, then export
#
# Example (the shipped model's training run):
#   training/tflite_env.sh all --checkpoint runs/default/checkpoint.pt \
#       --out runs/default/model.int8.tflite --calibration-images 200 \
#       --data ../shared/data/cxr/kermany_pneumonia_224
#
# Environment: TFLITE_VENV (venv folder, default .venv-tflite), PYTHON (interpreter that creates
# the venv, default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TFLITE_VENV:-$REPO/.venv-tflite}"
PYTHON="${PYTHON:-python3}"

# torch MUST stay the local CPU wheel: an unpinned torch pulls gigabytes of CUDA packages.
# litert-torch / ai-edge-quantizer: the versions this export was written and checked against.
CONSTRAINTS=(
    "torch==2.13.0"
    "litert-torch==0.10.0"
    "ai-edge-quantizer==0.10.0"
)

pip_install() {
    nice -n 10 "$VENV/bin/python" -m pip install --quiet -c "$VENV/constraints.txt" "$@"
}

setup() {
    local t0=$SECONDS
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PYTHON" -m venv "$VENV"
    fi
    printf '%s\n' "${CONSTRAINTS[@]}" >"$VENV/constraints.txt"
    # 1. torch first, alone, so pip settles on the local CPU wheel before anything can ask for it.
    pip_install "torch==2.13.0"
    # 2. The converter and the quantizer (they bring ai-edge-litert, their own numpy etc.).
    pip_install litert-torch ai-edge-quantizer
    # 3. What training.export.tflite_export imports from this repository:
    #    training.model.models -> efficientnet_lite_pytorch; edge_runtime.decode/preprocess -> numpy, cv2.
    #    (The Kermany images are JPEG; pydicom is only imported when a DICOM file is decoded.)
    #    edge_runtime.bundle also checks signatures (cryptography) and validates manifests (pydantic);
    #    training.evaluate.metrics scores with scikit-learn.
    pip_install efficientnet-lite-pytorch opencv-python-headless cryptography scikit-learn
    "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert", "numpy",
             "opencv-python-headless", "efficientnet-lite-pytorch"):
    print(f"  {name:28s} {md.version(name)}")
EOF
    echo "tflite venv ready in $VENV ($((SECONDS - t0)) s)"
}

export_model() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "No venv at $VENV: run '$0 setup' first." >&2
        exit 2
    fi
    cd "$REPO"
    nice -n 10 "$VENV/bin/python" -m training.export.tflite_export "$@"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    export) export_model "$@" ;;
    python) exec "$VENV/bin/python" "$@" ;;
    all) setup && export_model "$@" ;;
    *)
        sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
