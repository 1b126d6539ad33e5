#!/usr/bin/env bash
# The separate virtual environment for the TensorFlow/Keras training route (issue 29).
#
# TensorFlow pins its own numpy/protobuf ranges and is ~1.7 GB installed, so it lives in its own
# venv, .venv-keras/ at the repository root (git-ignored), never in the main environment (the edge
# runtime must never import tensorflow, keras or torch). Torch is NOT installed here: the
# PyTorch ImageNet weights are turned into a plain .npz in the main environment first
# (python -m training.keras.port_weights), and training.keras.efficientnet_lite reads that.
#
# Usage (from anywhere; the venv is found relative to the repository root):
#   training/keras_env.sh setup                  # create/refresh .venv-keras (downloads ~400 MB)
#   training/keras_env.sh python [ARGS...]       # the venv's python, with the repository importable
#
# Example (port the shared ImageNet weights, then build the Keras model with them):
#   .venv/bin/python -m training.keras.port_weights \
#       --weights ../shared/data/weights/efficientnet-lite0-57934424.pth --out /tmp/lite0.npz
#   training/keras_env.sh python -c "from training.keras.efficientnet_lite import \
#       build_efficientnet_lite0 as b; b(weights_npz='/tmp/lite0.npz').summary()"
#
# Environment: KERAS_VENV (venv folder, default .venv-keras), PYTHON (interpreter that creates
# the venv, default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KERAS_VENV:-$REPO/.venv-keras}"
PYTHON="${PYTHON:-python3}"

# tensorflow-cpu: no CUDA wheels (the training route is CPU-checked here; a GPU image pins its own).
# keras: the version training/keras/ was written and checked against (TF 2.21 needs keras >= 3.12).
CONSTRAINTS=(
    "tensorflow-cpu==2.21.0"
    "keras==3.15.1"
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
    # 1. TensorFlow and Keras 3 (they bring numpy, h5py, protobuf etc. in the ranges they accept).
    pip_install "${CONSTRAINTS[@]}"
    # 2. What training/keras/ reads besides them: numpy arrays (.npz/.npy) and images (Pillow); and
    #    tf2onnx + onnx, which write the FP32 ONNX graph of the export (training/keras/export_onnx.py).
    pip_install numpy pillow "tf2onnx==1.17.0" onnx
    "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ("tensorflow-cpu", "keras", "numpy", "pillow", "tf2onnx", "onnx"):
    print(f"  {name:28s} {md.version(name)}")
EOF
    echo "keras venv ready in $VENV ($((SECONDS - t0)) s)"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    python) PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" "$@" ;;
    *)
        sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
