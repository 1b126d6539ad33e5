"""``python -m training train --framework keras``: the Keras route end to end on a tiny Kermany run.

Two environments: the command runs HERE (split.json, the edge-preprocessed inputs in
``keras-inputs.npz``, the ported ImageNet weights) and trains in ``.venv-keras`` as a subprocess; the
saved ``model.keras`` is then loaded in ``.venv-keras`` by a child of this test. 16 training and 8
validation images at 64 px, 1 stage-1 epoch and 2 stage-2 epochs of at most 2 steps each.

The CLI run is ``slow``; it skips without ``.venv-keras``, ``../shared/data`` or torch, unless
``EDGE_RUNTIME_TESTS_REQUIRE_KERAS=1`` (then those fail).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    KERAS_PYTHON,
    KERMANY_ROOT,
    TINY_KERAS_LIMIT,
    TINY_KERAS_SEED,
    TINY_KERAS_SIZE,
    TINY_KERAS_VAL_FRACTION,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
KERMANY = KERMANY_ROOT
SIZE, LIMIT, VAL_FRACTION, SEED = TINY_KERAS_SIZE, TINY_KERAS_LIMIT, TINY_KERAS_VAL_FRACTION, TINY_KERAS_SEED

_CHILD = """
import json, sys
import numpy as np
import keras
from training.keras.efficientnet_lite import read_ported_weights
from training.keras.inputs import read_inputs

run = sys.argv[1]
model = keras.models.load_model(f"{run}/model.keras")
data = read_inputs(f"{run}/keras-inputs.npz")
x = np.concatenate([data.samples("val"), data.samples("train", 1)[:4]])
p = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
ported = read_ported_weights(f"{run}/imagenet-lite0.npz")

def same(layer, name, transpose=None):
    weights = model.get_layer(layer).get_weights()
    keys = ["weight", "bias", "running_mean", "running_var"] if transpose is None else ["weight"]
    expected = [ported[f"{name}.{k}"] for k in keys]
    if transpose is not None:
        expected = [expected[0].transpose(*transpose)]
    return all(np.array_equal(a, b) for a, b in zip(weights, expected))

print(json.dumps({
    "shape": list(p.shape),
    "finite": bool(np.isfinite(p).all()),
    "sum_error": float(np.abs(p.sum(axis=1) - 1).max()),
    "last_layer": type(model.layers[-1]).__name__,
    "input_shape": list(model.input.shape[1:]),
    "bn_frozen": same("blocks_12_bn1", "_blocks.12._bn1"),
    "front_frozen": same("blocks_3_expand_conv", "_blocks.3._expand_conv", (2, 3, 1, 0)),
    "back_trained": not same("blocks_12_expand_conv", "_blocks.12._expand_conv", (2, 3, 1, 0)),
}))
"""


@pytest.fixture(scope="module")
def run(tiny_keras_run: tuple[Path, str]) -> dict:
    folder, output = tiny_keras_run
    child = subprocess.run(
        [str(KERAS_PYTHON), "-c", _CHILD, str(folder)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return {
        "folder": folder,
        "output": output,
        "child": json.loads(child.stdout.strip().splitlines()[-1]),
        "summary": json.loads((folder / "keras_train_summary.json").read_text(encoding="utf-8")),
    }


@pytest.mark.slow
def test_the_split_is_the_pytorch_routes(run: dict) -> None:
    from edge_runtime.preprocess import PreprocessSpec
    from training.data.datasets import open_dataset, spec_for_size, split_record

    dataset = open_dataset(KERMANY.resolve(), val_fraction=VAL_FRACTION, seed=SEED, limit_per_class=LIMIT)
    spec = spec_for_size(PreprocessSpec(), SIZE, dataset.image_shape())
    recorded = json.loads((run["folder"] / "split.json").read_text(encoding="utf-8"))
    assert recorded == json.loads(json.dumps(split_record(dataset, spec)))
    assert (len(recorded["train"]), len(recorded["val"])) == (16, 8)
    assert not {Path(i).name for i in recorded["train"]} & {Path(i).name for i in recorded["val"]}
    assert all(i.startswith("train/") for i in recorded["train"] + recorded["val"])  # never test/


@pytest.mark.slow
def test_the_inputs_are_the_edge_preprocessing_of_the_files(run: dict) -> None:
    from edge_runtime.decode import decode_file
    from edge_runtime.preprocess import PreprocessSpec, preprocess
    from training.keras.inputs import read_inputs

    data = read_inputs(run["folder"] / "keras-inputs.npz")
    spec = PreprocessSpec.from_dict(data.spec)
    split = json.loads((run["folder"] / "split.json").read_text(encoding="utf-8"))
    assert data.spec == split["spec"] and data.arrays["lut"].dtype == np.float32
    assert data.arrays["train_levels"].dtype == np.uint8 and data.views == 2
    for name in ("train", "val"):
        ids = [str(i) for i in data.arrays[f"{name}_ids"]]
        assert ids == split[name]
        samples = data.samples(name, 0)
        assert samples.shape == (len(ids), SIZE, SIZE, 3) and samples.dtype == np.float32
        for row in (0, len(ids) - 1):
            edge = preprocess(decode_file(KERMANY / ids[row]).pixels, spec)  # NCHW, as the bundle's spec
            np.testing.assert_array_equal(samples[row], edge.transpose(1, 2, 0))
    labels = [int(Path(i).parent.name == "PNEUMONIA") for i in split["val"]]
    np.testing.assert_array_equal(data.val_labels, labels)


@pytest.mark.slow
def test_the_saved_model_gives_probabilities(run: dict) -> None:
    child = run["child"]
    assert child["shape"] == [8 + 4, 2] and child["finite"], child
    assert child["sum_error"] < 1e-5 and child["last_layer"] == "Softmax"
    assert child["input_shape"] == [SIZE, SIZE, 3]
    # Stage 2 trained the blocks >= cut; the front and (by default) BatchNorm kept ImageNet's values.
    assert child["back_trained"] and child["front_frozen"] and child["bn_frozen"], child


@pytest.mark.slow
def test_the_summary_records_calibration_schedule_and_versions(run: dict) -> None:
    summary = run["summary"]
    calibration = summary["calibration"]
    assert calibration["temperature"] > 0 and np.isfinite(calibration["temperature"])
    assert calibration["val_log_loss"]["after"] <= calibration["val_log_loss"]["before"] + 1e-12
    assert calibration["val_auc"]["before"] == pytest.approx(calibration["val_auc"]["after"])
    assert summary["stage1"]["epochs"] == 1 and summary["stage2"]["epochs_run"] >= 1
    assert summary["stage2"]["steps_per_epoch"] == 2 and summary["stage2"]["seconds_per_epoch"] > 0
    assert {"tensorflow-cpu", "keras", "numpy", "python"} <= set(summary["environment"])
    assert summary["saved_model"]["full_vs_cached_max_abs_dp"] < 1e-2
    assert "ported to" in run["output"] and "random initialisation" not in run["output"]


def test_the_numpy_scores_match_the_metrics_module() -> None:
    """training.keras.scores (no scikit-learn in .venv-keras) computes what training.evaluate.metrics does."""
    metrics = pytest.importorskip("training.evaluate.metrics", reason="scikit-learn not installed")
    from training.keras import scores

    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    margin = rng.normal(0, 3, 200) + 2.0 * y
    p = np.round(1 / (1 + np.exp(-margin)), 2)  # rounded: many tied scores
    assert scores.roc_auc(y, p) == pytest.approx(metrics.roc_auc(y, p), abs=1e-12)
    assert scores.fit_temperature(y, margin) == pytest.approx(metrics.fit_temperature(y, margin), rel=1e-12)
    assert scores.log_loss(y, p) == pytest.approx(metrics.log_loss(y, p), abs=1e-12)


def test_a_missing_keras_environment_names_the_setup_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch", reason="torch (training extra) not installed")
    from training.cli import main

    monkeypatch.setenv("KERAS_VENV", str(tmp_path / "no-such-venv"))
    with pytest.raises(SystemExit) as info:
        main(["train", "--framework", "keras", "--out", str(tmp_path / "run")])
    assert "bash training/keras_env.sh setup" in str(info.value.code)
    with pytest.raises(SystemExit) as info:
        main(["train", "--max-steps", "2", "--out", str(tmp_path / "run")])
    assert "--framework keras only" in str(info.value.code)
