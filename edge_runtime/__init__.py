"""HealthDiag edge runtime: watched inbox -> decode -> preprocess -> INT8 CNN -> MQTT.

The package reads as the pipeline it runs:

* :mod:`edge_runtime.sources`    where scans come from (the watched inbox; plugins)
* :mod:`edge_runtime.workers`    each scan through the stages, behind a back-pressure gate
* :mod:`edge_runtime.decode`     DICOM / PNG / JPEG -> grey float32 image + metadata
* :mod:`edge_runtime.preprocess` the one preprocessing spec shared with training
* :mod:`edge_runtime.backends`   ONNX Runtime / LiteRT behind one small interface
* :mod:`edge_runtime.pipeline`   one scan: decode -> intake -> preprocess -> backend -> result
* :mod:`edge_runtime.outcomes`   result / duplicate / quarantine -> journal records and files
* :mod:`edge_runtime.sinks`      outbox -> MQTT, Greengrass pub/sub, AWS IoT Core (plugins)
* :mod:`edge_runtime.health`     counters, status, heartbeat
* :mod:`edge_runtime.journal`    SQLite journal beside the pipeline: exactly-once in effect

This package never imports torch.
"""

__version__ = "0.3.0"
__all__ = ["__version__"]
