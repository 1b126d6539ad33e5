"""Cloud-side training for the edge runtime's models.

This package turns a chest X-ray set (Kermany paediatric pneumonia by default;
also nih1000_64, PneumoniaMNIST and the NIH 1024 px subset) into the INT8
bundle that ``edge_runtime`` loads. It deliberately reuses the edge's own
decoder (:func:`edge_runtime.decode.decode_file`) and preprocessing
(:func:`edge_runtime.preprocess.preprocess`) so that the model is trained on
exactly the tensors it will see on the device.

Sub-packages, one per stage, in pipeline order (the CLI runs them in this order):
    data/: reading the sets.
        images: items, patient ids, augmentation, the dataset and in-memory caches.
        datasets/: one reader per dataset kind, a registry, patient-disjoint
            splitting and the split in ``split.json`` (``prepare``).
    model/: training.
        models / architectures: the model registry (``build_model``) and the cut
            points used to fine-tune the last blocks on cached activations.
        train: staged transfer learning sized for a 2-core CPU, resumable (``train``).
    export/: the deployable model files.
        onnx_export: ONNX export (``export``) and INT8 static quantization (``quantize``).
        emulation / emulated_infer: ONNX Runtime on an emulated AVX2-only CPU (QEMU).
        tflite_export: the LiteRT INT8 route, in its own environment (``tflite_env.sh``).
    evaluate/: the numbers.
        scoring: P(positive) through the edge's backend and the manifest's head.
        metrics: binary metrics, intervals, calibration and the threshold rule.
        report: threshold on validation, test metrics (``evaluate``).
        evaluation_report/: the Markdown + PNG report (``evaluate-report``).
    bundle/: what the edge loads (``package``).
        manifest / model_card / card_sections / conformance_set / model_id / package.
    keras/: the TensorFlow/Keras route (issue 29), in its own environment (``keras_env.sh``).
        port_weights (main environment: .pth -> .npz) / efficientnet_lite (Keras 3 Lite0).
Beside them: run_files (the names of the files in a run folder, shared by every stage;
torch-free) and cli (``python -m training <command>``; ``pipeline`` runs them in order).

``data``, ``evaluate`` and ``run_files`` import without torch (their ``__init__`` modules
import nothing), so benchmarks and tools that run next to the edge code can reuse them.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
