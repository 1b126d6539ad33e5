"""A Kermany bundle's model card says which training targets the model meets, from the run's own numbers.

A tiny real run (EfficientNet-Lite0, 4+4 Kermany images at 64 px, one
epoch) goes through export, quantize, evaluate (the full official test
split) and package; the card's targets table must agree with metrics
recomputed here from the run's test predictions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from helpers import TEST_KEY_FINGERPRINT, TEST_PUBLIC_KEY, TEST_SIGNING_KEY

from edge_runtime.bundle import BundleTrust, load_bundle
from edge_runtime.errors import ModelBundleError
from edge_runtime.preprocess import PreprocessSpec
from edge_runtime.signing import SIGNATURE_NAME
from training.bundle.package import MODEL_CARD_NAME, TARGETS, TEST_PREDICTIONS_NAME, package_bundle
from training.evaluate.metrics import roc_auc, sensitivity_at_specificity
from training.evaluate.ood import run_ood
from training.evaluate.report import run_evaluation
from training.export.onnx_export import run_export
from training.model.train import TrainConfig, train

WEIGHTS = Path("weights/efficientnet-lite0-57934424.pth")


@pytest.fixture(scope="module")
def tiny_kermany_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = shared_data / WEIGHTS
    if not weights.is_file():
        pytest.skip(f"EfficientNet-Lite0 ImageNet weights not found at {weights}")
    run = tmp_path_factory.mktemp("kermany") / "run"
    train(
        TrainConfig(
            data_root=shared_data / "cxr" / "kermany_pneumonia_224",
            out_dir=run,
            weights=weights,
            spec=PreprocessSpec(height=64, width=64),
            limit_per_class=4,
            val_fraction=0.25,
            aug_views=0,
            batch_size=4,
            eval_batch_size=8,
            head_epochs=1,
            epochs=1,
            warmup_steps=0,
            threads=1,
            device="cpu",
        )
    )
    run_export(run, calibration_images=4, threads=1)
    run_ood(run, threads=1)
    run_evaluation(run, threads=1)
    return run


def test_card_lists_each_target_as_met_or_missed(tiny_kermany_run: Path, tmp_path: Path) -> None:
    run = tiny_kermany_run
    bundle = load_bundle(package_bundle(run, tmp_path / "bundle", signing_key=TEST_SIGNING_KEY))
    assert bundle.backends == ["onnxruntime"]  # no TFLite in this run
    assert bundle.signature.verified and bundle.signature.signer == TEST_KEY_FINGERPRINT
    # The model file carries the id its manifest entry records (checked by the backend at load).
    import onnxruntime as ort

    artifact = bundle.artifact("onnxruntime")
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    assert artifact.model_id is not None
    assert session.get_modelmeta().custom_metadata_map["healthdiag.model_id"] == artifact.model_id
    card = (tmp_path / "bundle" / MODEL_CARD_NAME).read_text(encoding="utf-8")
    section = card[card.index("## Targets") : card.index("## Limitations")]

    evaluation = json.loads((run / "evaluation.json").read_text())
    with np.load(run / TEST_PREDICTIONS_NAME) as saved:
        y, p = saved["y"], saved["int8"]
    assert y.size == 624  # the whole official test split
    auc = roc_auc(y, p)
    sens, _ = sensitivity_at_specificity(y, p, TARGETS["at_specificity"])
    drop = evaluation["test"]["reference"]["fp32_at_threshold"]["auc"] - evaluation["test"]["int8"]["auc"]
    expected = {
        "AUC": auc >= TARGETS["auc"],
        "accuracy": evaluation["test"]["int8"]["accuracy"] >= TARGETS["accuracy"],
        "sensitivity": sens >= TARGETS["sensitivity"],
        "INT8 vs FP32 AUC drop": drop <= TARGETS["max_auc_drop"],
        "INT8 ONNX": (run / "model.int8.onnx").stat().st_size / 1e6 <= TARGETS["max_int8_mb"],
    }
    rows = re.findall(r"^\| (.+?) \| (.+?) \| (met|\*\*missed\*\*) \|$", section, flags=re.MULTILINE)
    assert len(rows) == len(expected)
    for (text, value, verdict), (name, ok) in zip(rows, expected.items(), strict=True):
        assert text.startswith(name)
        assert (verdict == "met") == ok, (text, value)
    assert f"| {auc:.4f} |" in section
    met = sum(expected.values())
    assert f"meets {met} of the {len(expected)} targets" in section


def test_package_signs_with_signing_key_and_says_when_it_cannot(
    tiny_kermany_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    signed = tmp_path / "signed"
    argv = ["package", "--out", str(tiny_kermany_run), "--bundle", str(signed), "--version", "0.3.1"]
    assert main([*argv, "--signing-key", str(TEST_SIGNING_KEY)]) == 0
    assert f"signed by key {TEST_KEY_FINGERPRINT}" in capsys.readouterr().out
    only_that_key = BundleTrust.from_entries([TEST_PUBLIC_KEY])  # what a box trusting it checks
    assert load_bundle(signed, trust=only_that_key).signature.verified
    assert SIGNATURE_NAME not in json.loads((signed / "manifest.json").read_text())["files"]

    unsigned = tmp_path / "unsigned"
    assert main(["package", "--out", str(tiny_kermany_run), "--bundle", str(unsigned)]) == 0
    captured = capsys.readouterr()
    assert "no --signing-key" in captured.err and "RequireSignature is false" in captured.err
    assert "UNSIGNED" in captured.out and not (unsigned / SIGNATURE_NAME).exists()
    with pytest.raises(ModelBundleError, match="not signed"):
        load_bundle(unsigned, trust=only_that_key)
    development = BundleTrust.from_entries([TEST_PUBLIC_KEY], require_signature=False)
    assert load_bundle(unsigned, trust=development).signature.status == "not verified"
