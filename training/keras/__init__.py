"""The TensorFlow/Keras training route (issue 29), beside the PyTorch one.

Two environments, like the TFLite export:
    port_weights: runs in the MAIN environment (it needs torch): a PyTorch ``state_dict``
        (the shared EfficientNet-Lite0 ImageNet weights, or a checkpoint) -> a plain ``.npz``.
    efficientnet_lite: runs ONLY in ``.venv-keras`` (``training/keras_env.sh``): EfficientNet-Lite0
        in Keras 3, layer for layer ``efficientnet_lite_pytorch``'s, loading that ``.npz``.

This ``__init__`` imports nothing, so importing one module never drags in the other's framework.
"""
