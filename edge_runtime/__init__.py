"""HealthDiag edge runtime: watched inbox -> decode -> preprocess -> INT8 CNN -> MQTT.

The package reads as the pipeline it runs:

* :mod:`edge_runtime.ingest`     watched inbox folder (files only once complete)
* :mod:`edge_runtime.decode`     DICOM / PNG / JPEG -> grey float32 image + metadata
* :mod:`edge_runtime.preprocess` the one preprocessing spec shared with training
* :mod:`edge_runtime.backends`   ONNX Runtime / LiteRT behind one small interface
* :mod:`edge_runtime.publish`    MQTT results and status
* :mod:`edge_runtime.journal`    SQLite journal beside the pipeline: exactly-once in effect

This package never imports torch.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
