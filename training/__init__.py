"""Cloud-side training for the edge runtime's models.

This package turns the Kermany paediatric chest X-ray set into the INT8 ONNX
bundle that ``edge_runtime`` ships by default. It deliberately reuses the
edge's own decoder (:func:`edge_runtime.decode.decode_file`) and
preprocessing (:func:`edge_runtime.preprocess.preprocess`) so that the model
is trained on exactly the tensors it will see on the device.

Modules:
    data: file listing, patient-disjoint split, dataset and in-memory caches.
    models: the model registry (``build_model``) and the cut points used to
        fine-tune the last blocks on cached activations.
    train: two-stage transfer learning sized for a 2-core CPU.
    evaluate: AUC, sensitivity/specificity and the operating threshold.
    export: ONNX export (softmax in the graph) and INT8 static quantization.
    package: the model bundle (model, manifest, model card).
    cli: ``python -m training pipeline ...``.

Only ``data`` and ``evaluate`` are importable without torch, so benchmarks
and tools that run next to the edge code can reuse them.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
