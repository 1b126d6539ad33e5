"""The Keras EfficientNet-Lite0 (``training/keras/``) gives the PyTorch model's ImageNet logits.

Two environments: the PyTorch model (``training.model.models``, the shared ImageNet weights) runs
HERE, and the weights are ported to an ``.npz`` here too (``training.keras.port_weights`` needs
torch); the Keras model runs in ``.venv-keras`` (``training/keras_env.sh setup``) as a subprocess,
on the same normalised NHWC batch, and writes its logits back. Real images: Kermany test X-rays
(both classes) and the two natural photographs of the shared Coral test data, whose ImageNet
classes are known (``cat.bmp`` -> 285 Egyptian cat, ``grace_hopper.bmp`` -> 652 military uniform).

Skips without ``.venv-keras`` or ``../shared/data``, unless ``EDGE_RUNTIME_TESTS_REQUIRE_KERAS=1``
(then those fail).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import IMAGENET_LITE0, KERAS_PYTHON, SHARED_DATA, need_keras_route
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGENET_WEIGHTS = IMAGENET_LITE0
KERMANY_TEST = SHARED_DATA / "cxr" / "kermany_pneumonia_224" / "test"
PHOTOS = SHARED_DATA / "weights" / "tflite_coral"
#: ImageNet classes of the two photographs (PROVENANCE.md: checked with this model and LiteRT).
PHOTO_CLASSES = {"cat.bmp": 285, "grace_hopper.bmp": 652}
PER_CLASS = 3
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

#: Largest |Keras - PyTorch| logit accepted. Measured 9.8e-6 on this 2-core x86-64 CPU (8 images,
#: logits from -4.5 to 10.1): FP32 rounding only, the two frameworks' convolution kernels
#: (PyTorch's oneDNN, TensorFlow's) accumulating in different orders through 34 conv layers.
#: 1e-3 leaves ~100x margin for other CPUs/kernels and is 7e-5 of the logit span, while a wrong
#: port is far above it: BN eps 1e-5 instead of 1e-3 gave 3.7, symmetric PyTorch padding instead
#: of TF SAME 4.6 (each also changed top-1 classes). The top-5 sets are compared exactly: the
#: smallest 5th/6th logit gap of these images is 0.012, over 2x the tolerance.
ATOL = 1e-3

_CHILD = """
import json, sys
import numpy as np
from training.keras.efficientnet_lite import build_efficientnet_lite0, load_ported_weights
from training.keras.efficientnet_lite import read_ported_weights

npz, batch, out = sys.argv[1:4]
model = build_efficientnet_lite0(num_classes=1000, input_shape=(224, 224, 3), weights_npz=npz)
np.save(out, np.asarray(model(np.load(batch), training=False), dtype=np.float32))

# A partial load fails loudly, both ways.
tensors = read_ported_weights(npz)
errors = {}
for case, arrays in {
    "extra tensor": {**tensors, "_blocks.3._extra.weight": np.zeros(3, np.float32)},
    "missing tensor": {k: v for k, v in tensors.items() if k != "_blocks.7._bn1.running_var"},
}.items():
    try:
        load_ported_weights(build_efficientnet_lite0(), arrays)
    except ValueError as exc:
        errors[case] = str(exc)
# Transfer learning: a 2-class head stays fresh, the backbone is the file's.
two = build_efficientnet_lite0(num_classes=2, weights_npz=npz)
head = two.get_layer("conv_head").get_weights()[0]
print(json.dumps({
    "errors": errors,
    "two_class_outputs": int(two.output.shape[-1]),
    "two_class_backbone": bool(np.array_equal(head, tensors["_conv_head.weight"].transpose(2, 3, 1, 0))),
}))
"""


def _images() -> list[Path]:
    kermany = [
        path
        for label in ("NORMAL", "PNEUMONIA")
        for path in sorted((KERMANY_TEST / label).glob("*.jpeg"))[:PER_CLASS]
    ]
    return [*kermany, *(PHOTOS / name for name in PHOTO_CLASSES)]


def _batch(paths: list[Path]) -> np.ndarray:
    """NHWC float32, 224 px RGB, ImageNet mean/std (the normalisation stays outside both models)."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
        images.append((np.asarray(rgb, dtype=np.float32) / 255.0 - MEAN) / STD)
    return np.stack(images).astype(np.float32)


@pytest.fixture(scope="module")
def logits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    need_keras_route(IMAGENET_WEIGHTS, KERMANY_TEST, PHOTOS)
    torch = pytest.importorskip("torch", reason="torch (training extra) not installed")
    pytest.importorskip("efficientnet_lite_pytorch", reason="training extra not installed")
    from training.keras.port_weights import port_state_dict
    from training.model.models import build_model

    folder = tmp_path_factory.mktemp("keras-port")
    paths = _images()
    batch = _batch(paths)
    model = build_model("efficientnet-lite0", 1000, IMAGENET_WEIGHTS).eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())).numpy()

    npz, batch_file, out = folder / "lite0.npz", folder / "batch.npy", folder / "keras_logits.npy"
    port_state_dict(IMAGENET_WEIGHTS, npz)
    np.save(batch_file, batch)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [str(KERAS_PYTHON), "-c", _CHILD, str(npz), str(batch_file), str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "names": [p.name for p in paths],
        "torch": expected,
        "keras": np.load(out),
        "child": json.loads(done.stdout.strip().splitlines()[-1]),
    }


def test_keras_gives_the_pytorch_imagenet_logits(logits: dict) -> None:
    torch_logits, keras_logits = logits["torch"], logits["keras"]
    assert keras_logits.shape == torch_logits.shape == (len(logits["names"]), 1000)
    difference = np.abs(keras_logits - torch_logits)
    print(f"max |keras - torch| logit: {difference.max():.3g} (per image {difference.max(axis=1)})")
    assert difference.max() <= ATOL, dict(zip(logits["names"], difference.max(axis=1), strict=True))
    np.testing.assert_array_equal(keras_logits.argmax(axis=1), torch_logits.argmax(axis=1))
    top5 = [
        (set(np.argsort(-k)[:5].tolist()), set(np.argsort(-t)[:5].tolist()))
        for k, t in zip(keras_logits, torch_logits, strict=True)
    ]
    assert all(k == t for k, t in top5), top5
    # The weights are the ImageNet ones, not merely equal garbage: the photographs' known classes.
    predicted = dict(zip(logits["names"], keras_logits.argmax(axis=1).tolist(), strict=True))
    assert {name: predicted[name] for name in PHOTO_CLASSES} == PHOTO_CLASSES


def test_a_partial_or_mismatched_load_fails_loudly(logits: dict) -> None:
    errors = logits["child"]["errors"]
    assert "have no Keras layer" in errors.get("extra tensor", ""), errors
    assert "_blocks.3._extra.weight" in errors["extra tensor"]
    assert "needs '_blocks.7._bn1.running_var'" in errors.get("missing tensor", ""), errors


def test_another_class_count_keeps_the_backbone_and_a_fresh_head(logits: dict) -> None:
    assert logits["child"]["two_class_outputs"] == 2
    assert logits["child"]["two_class_backbone"] is True
