"""The names of the files in a training run folder (``python -m training pipeline --out RUN``).

One torch-free module, so that the readers of a run (the dataset split
reader, packaging, the reports, the benchmarks, the TFLite exporter in its
own virtual environment) name the same files as the stages that write them
without importing the stages, several of which need torch.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CALIBRATION_NAME",
    "CHECKPOINT_NAME",
    "EVALUATION_NAME",
    "EXPORT_SUMMARY",
    "FP32_NAME",
    "FP32_RAW_NAME",
    "FRAMEWORK_COLUMNS",
    "INT8_NAME",
    "KERAS_INPUTS_NAME",
    "KERAS_MODEL_NAME",
    "KERAS_SUMMARY_NAME",
    "KERAS_TFLITE_NAME",
    "KERAS_TFLITE_SUMMARY",
    "KERAS_TFLITE_VAL",
    "KERAS_WEIGHTS_NAME",
    "RESUME_NAME",
    "SPLIT_NAME",
    "SUMMARY_NAME",
    "TEST_PREDICTIONS",
    "TFLITE_EXPORT_SUMMARY",
    "TFLITE_NAME",
    "VAL_PREDICTIONS",
    "framework_column",
]

#: ``train``: the best stage-2 checkpoint, the resumable state, the split and the summary.
CHECKPOINT_NAME = "checkpoint.pt"
RESUME_NAME = "stage2_resume.pt"
SPLIT_NAME = "split.json"
SUMMARY_NAME = "train_summary.json"
#: ``export``: the temperature fitted on validation, the ONNX models and their validation scores.
CALIBRATION_NAME = "calibration.json"
FP32_NAME = "model.fp32.onnx"
#: An exporter's graph before ``finish_fp32_graph`` (training/export/onnx_export.py) makes it FP32_NAME.
FP32_RAW_NAME = "model.fp32.raw.onnx"
INT8_NAME = "model.int8.onnx"
EXPORT_SUMMARY = "export_summary.json"
VAL_PREDICTIONS = "val_predictions.npz"
#: ``evaluate``: the operating point, the test metrics and the test P(positive).
EVALUATION_NAME = "evaluation.json"
#: The column of ``val_predictions.npz`` holding the training framework's own P(positive) (PyTorch's,
#: or the Keras FP32 model's for a Keras run); ``fp32`` and ``int8`` are the ONNX files'.
FRAMEWORK_COLUMNS = ("torch", "keras")
TEST_PREDICTIONS = "test_predictions.npz"
#: ``training/tflite_env.sh export --out RUN/model.int8.tflite``; shipped when present.
TFLITE_NAME = "model.int8.tflite"
TFLITE_EXPORT_SUMMARY = "tflite_export_summary.json"
#: ``train --framework keras`` (training/keras/): the inputs handed from the main environment to
#: ``.venv-keras``, the ported ImageNet weights, the trained (calibrated) Keras model and its summary.
KERAS_INPUTS_NAME = "keras-inputs.npz"
KERAS_WEIGHTS_NAME = "imagenet-lite0.npz"
KERAS_MODEL_NAME = "model.keras"
KERAS_SUMMARY_NAME = "keras_train_summary.json"
#: ``export --framework keras`` (training/keras/export_tflite.py): the INT8 LiteRT file converted by
#: TensorFlow's converter from ``model.keras``, its summary (with the main environment's check through
#: the edge's LiteRT backend) and the validation outputs both environments compare.
KERAS_TFLITE_NAME = "model.int8.keras.tflite"
KERAS_TFLITE_SUMMARY = "keras_tflite_export_summary.json"
KERAS_TFLITE_VAL = "keras_tflite_val.npz"


def framework_column(columns: Sequence[str]) -> str:
    """Which of :data:`FRAMEWORK_COLUMNS` a ``val_predictions.npz`` with ``columns`` holds."""
    found = [name for name in FRAMEWORK_COLUMNS if name in columns]
    if len(found) != 1:
        raise ValueError(
            f"{VAL_PREDICTIONS} has columns {sorted(columns)}: expected exactly one of {FRAMEWORK_COLUMNS}"
        )
    return found[0]
