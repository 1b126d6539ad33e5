"""Training is reproducible and resumable.

Tiny real runs (EfficientNet-Lite0 from the shipped ImageNet weights, 4+4
real Kermany images at 64 px, three stage-2 epochs):

* the same config twice gives bit-identical weights (seeded split,
  augmentation, shuffling and initialisation);
* a run killed after its first stage-2 epoch and restarted with
  ``resume=True`` ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edge_runtime.preprocess import PreprocessSpec  # noqa: E402
from training.model import train as train_module  # noqa: E402
from training.model.train import RESUME_NAME, TrainConfig, load_checkpoint, train  # noqa: E402

WEIGHTS = Path("weights/efficientnet-lite0-57934424.pth")


def _config(shared_data: Path, out: Path, **overrides: object) -> TrainConfig:
    weights = shared_data / WEIGHTS
    if not weights.is_file():
        pytest.skip(f"EfficientNet-Lite0 ImageNet weights not found at {weights}")
    values: dict[str, object] = {
        "data_root": shared_data / "cxr" / "kermany_pneumonia_224",
        "out_dir": out,
        "weights": weights,
        "seed": 7,
        "spec": PreprocessSpec(height=64, width=64),
        "limit_per_class": 4,
        "val_fraction": 0.25,
        "aug_views": 1,
        "batch_size": 2,
        "eval_batch_size": 8,
        "head_epochs": 1,
        "epochs": 3,
        "patience": 10,
        "warmup_steps": 0,
        "threads": 1,
        "time_budget_s": 600.0,
        "device": "cpu",
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(run)
    return model.state_dict()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class _Killed(Exception):
    """Stands in for the process dying right after an epoch's state was saved."""


def _crash_after_first_epoch(shared_data: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train into ``out`` until the first stage-2 state is on disk, then die there."""
    real_save = train_module._save_resume

    def save_then_die(path: Path, cfg: TrainConfig, state: dict) -> None:
        real_save(path, cfg, state)
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_save_resume", save_then_die)
        with pytest.raises(_Killed):
            train(_config(shared_data, out))


@pytest.fixture(scope="module")
def reference(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reference")
    summary = train(_config(shared_data, out))
    return out, summary


def test_same_config_gives_identical_weights(
    shared_data: Path, reference: tuple[Path, dict], tmp_path: Path
) -> None:
    ref_dir, ref_summary = reference
    again = train(_config(shared_data, tmp_path / "again"))
    assert again["stage2"]["epochs_run"] == ref_summary["stage2"]["epochs_run"] == 3
    assert [h["val_auc"] for h in again["stage2"]["history"]] == [
        h["val_auc"] for h in ref_summary["stage2"]["history"]
    ]
    _assert_same(_weights(ref_dir), _weights(tmp_path / "again"))


def test_resume_after_a_crash_matches_an_uninterrupted_run(
    shared_data: Path, reference: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref_dir, ref_summary = reference
    out = tmp_path / "crashed"
    _crash_after_first_epoch(shared_data, out, monkeypatch)
    assert (out / RESUME_NAME).is_file()
    assert not (out / "checkpoint.pt").exists()

    summary = train(_config(shared_data, out, resume=True, time_budget_s=900.0))
    assert summary["stage2"]["epochs_run"] == 3
    assert summary["stage2"]["best_epoch"] == ref_summary["stage2"]["best_epoch"]
    _assert_same(_weights(ref_dir), _weights(out))
    assert not (out / RESUME_NAME).exists(), "a finished run leaves nothing to resume"


def test_resume_refuses_a_state_saved_with_other_settings(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _crash_after_first_epoch(shared_data, out, monkeypatch)
    with pytest.raises(ValueError, match="different settings"):
        train(_config(shared_data, out, resume=True, lr=1e-3))
