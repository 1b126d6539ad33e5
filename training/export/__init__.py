"""Export stage: checkpoint to ONNX/INT8 and TFLite; apart since parts run in their own venv or QEMU."""
