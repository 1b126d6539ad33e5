"""Cloud-side training for the edge runtime's models.

This package turns a chest X-ray set (Kermany paediatric pneumonia by default;
also nih1000_64, PneumoniaMNIST and the NIH 1024 px subset) into the INT8
bundle that ``edge_runtime`` loads. It deliberately reuses the edge's own
decoder (:func:`edge_runtime.decode.decode_file`) and preprocessing
(:func:`edge_runtime.preprocess.preprocess`) so that the model is trained on
exactly the tensors it will see on the device.

Modules, in pipeline order:
    run_files: the names of the files in a run folder (torch-free).
    datasets: one reader per dataset kind, a registry, patient-disjoint
        splitting and the split in ``split.json`` (``prepare``).
    data: items, augmentation, the dataset and in-memory caches.
    models / architectures: the model registry (``build_model``) and the cut
        points used to fine-tune the last blocks on cached activations.
    train: staged transfer learning sized for a 2-core CPU, resumable (``train``).
    export: ONNX export (``export``) and INT8 static quantization (``quantize``).
    scoring: P(positive) through the edge's backend and the manifest's head.
    report / evaluate: threshold on validation, test metrics (``evaluate``).
    manifest / model_card / card_sections / package: the model bundle (``package``).
    evaluation_report: the Markdown + PNG report (``evaluate-report``).
    tflite_export: the LiteRT INT8 route, in its own environment.
    cli: ``python -m training <command>``; ``pipeline`` runs them in order.

``data``, ``datasets``, ``evaluate``, ``run_files``, ``scoring``, ``report`` and
``evaluation_report`` import without torch, so benchmarks
and tools that run next to the edge code can reuse them.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
