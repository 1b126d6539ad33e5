"""Model stage: architectures, the model registry and staged fine-tuning (``train``); needs torch."""
