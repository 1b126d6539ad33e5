"""The TensorFlow/Keras training route (issue 29), beside the PyTorch one.

Two environments, like the TFLite export:
    port_weights: runs in the MAIN environment (it needs torch): a PyTorch ``state_dict``
        (the shared EfficientNet-Lite0 ImageNet weights, or a checkpoint) -> a plain ``.npz``.
    efficientnet_lite: runs ONLY in ``.venv-keras`` (``training/keras_env.sh``): EfficientNet-Lite0
        in Keras 3, layer for layer ``efficientnet_lite_pytorch``'s, loading that ``.npz``.
    dataset: MAIN environment: the run's ``split.json`` and ``keras-inputs.npz`` (the training and
        validation inputs exactly as the edge preprocesses them), with the PyTorch route's code.
    train: ONLY ``.venv-keras``: two-stage training, temperature scaling, ``model.keras`` and
        ``keras_train_summary.json``. ``python -m training train --framework keras`` runs all three steps.
    export_tflite: ONLY ``.venv-keras``: ``model.keras`` -> INT8 ``model.int8.keras.tflite`` (probabilities,
        CAM heat-map, pooled features) with TensorFlow's converter; ``export --framework keras``.
    check_litert: MAIN environment: that file through the edge's ``LiteRtBackend`` on the run's images.
    inputs, scores: numpy only, imported in both: the ``keras-inputs.npz`` reader, and AUC/log-loss/
        temperature without scikit-learn (which ``.venv-keras`` lacks).

This ``__init__`` imports nothing, so importing one module never drags in the other's framework.
"""
