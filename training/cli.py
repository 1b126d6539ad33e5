"""Command line: ``python -m training <command>``, one command per stage plus ``pipeline``.

``pipeline`` is the one-shot path that produced the bundled default model::

    python -m training pipeline \\
        --data ../shared/data/cxr/kermany_pneumonia_224 \\
        --weights ../shared/data/weights/efficientnet-lite0-57934424.pth \\
        --out runs/default --bundle edge_runtime/models/pneumonia-cxr

The stages communicate only through files in the run folder (checkpoint,
``split.json``, ONNX models, JSON summaries), so any stage can be re-run on
its own, e.g. to re-package after editing the model card template.

Why one module over 500 lines: each subcommand's arguments and help text sit beside the
others so ``--help`` stays consistent; the work itself is in the stage modules.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

_DEFAULT_DATA = "../shared/data/cxr/kermany_pneumonia_224"
# ImageNet weights that exist on the build machines, per model; the other families have none
# here (torchvision's files cannot be downloaded) and start from random weights unless --weights
# names a local file.
_BUNDLED_WEIGHTS = {"efficientnet-lite0": "../shared/data/weights/efficientnet-lite0-57934424.pth"}


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/default"),
        help="run folder for checkpoints, ONNX files and summaries (default: %(default)s; "
        "keep it under runs/, which git ignores)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="dataset: a class-per-folder root {train,test}/<class>/ (Kermany, nih1000_64), a "
        "PneumoniaMNIST .npz or its folder, or the NIH 1024 px subset folder (see training/README.md, "
        f"'Datasets'). train: default {_DEFAULT_DATA}; evaluate: default the data recorded in the "
        "run's split.json",
    )


def _add_train(p: argparse.ArgumentParser) -> None:
    from .model.models import describe_models

    models = describe_models()
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="local state_dict for --model (torchvision's naming for ResNet/VGG/DenseNet/MobileNet; "
        "a 1000-class ImageNet head is replaced); nothing is downloaded. Default: "
        + ", ".join(f"{name}: {path}" for name, path in _BUNDLED_WEIGHTS.items())
        + "; every other model starts from random weights. 'none' forces random weights.",
    )
    p.add_argument(
        "--model",
        default="efficientnet-lite0",
        choices=list(models),
        metavar="NAME",
        help="architecture from the registry (default: %(default)s): "
        + "; ".join(f"{name} = {text}" for name, text in models.items()),
    )
    p.add_argument(
        "--size",
        type=int,
        default=224,
        help="square network input in px for training (default: %(default)s; e.g. 64 for the 28/64 px "
        "sets); export, evaluate and package always use the spec the run was trained with",
    )
    p.add_argument("--seed", type=int, default=2018, help="split/augmentation/init seed")
    p.add_argument("--val-fraction", type=float, default=0.15, help="validation share of train")
    p.add_argument(
        "--cut",
        type=int,
        default=None,
        help="first trainable block (default: the model's; EfficientNet-Lite0: 8 of 16, see "
        "training/README.md for the others). Lower trains more blocks; epochs get slower.",
    )
    p.add_argument("--aug-views", type=int, default=1, help="augmented views per train image")
    p.add_argument("--epochs", type=int, default=10, help="stage-2 maximum epochs")
    p.add_argument("--patience", type=int, default=3, help="early-stopping patience (epochs)")
    p.add_argument("--head-epochs", type=int, default=30, help="stage-1 (classifier) epochs")
    p.add_argument("--batch-size", type=int, default=32, help="stage-2 batch size")
    p.add_argument("--lr", type=float, default=3e-4, help="stage-2 learning rate of the blocks")
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=20.0,
        help="wall-clock budget of the training stage in minutes; stage-2 epochs are capped "
        "from a timing probe to fit (default: %(default)s)",
    )
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=0.1,
        help="cross-entropy label smoothing; keeps outputs off 0/1 (default: %(default)s)",
    )
    p.add_argument(
        "--augment",
        choices=("standard", "mild"),
        default="standard",
        help="augmentation strength: standard = rotation 10 deg, zoom 0.9-1.25 with aspect "
        "jitter 1.2 (random resized crop), shift 6%%, brightness/contrast/gamma; mild = what "
        "bundle 0.1.0 used (default: %(default)s)",
    )
    p.add_argument(
        "--hflip",
        action="store_true",
        help="also flip horizontally (off by default: a flipped chest film is not a plausible input)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where to train: auto (a CUDA GPU when present, else the CPU), cpu, cuda, cuda:1 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out from its last completed stage-2 epoch "
        "(same options required)",
    )
    p.add_argument(
        "--train-bn",
        action="store_true",
        help="update BatchNorm statistics in stage 2 (default: frozen)",
    )
    p.add_argument(
        "--limit-per-class",
        type=int,
        default=None,
        help="use at most N training images per class (smoke tests only)",
    )


def _add_framework(p: argparse.ArgumentParser, command: str) -> None:
    what = (
        "; the export then writes the INT8 LiteRT file and the FP32 ONNX graph in .venv-keras, and "
        "quantize, ood, evaluate and package run here as for PyTorch"
        if command == "pipeline"
        else ""
    )
    p.add_argument(
        "--framework",
        choices=("torch", "keras"),
        default="torch",
        help="torch (default): PyTorch in this environment; keras: TensorFlow/Keras in .venv-keras "
        f"(EfficientNet-Lite0 only; no --resume, and no --device: TensorFlow uses its own){what}",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="keras only: cap on optimizer steps per epoch in both stages (smoke tests)",
    )


def _add_recipe(p: argparse.ArgumentParser) -> None:
    recipes = (
        "u8s8-rr",
        "s8s8",
        "s8s8-rr",
        "u8s8",
        "u8u8",
    )  # training.export.onnx_export.RECIPES (torch-free here)
    p.add_argument(
        "--recipe",
        choices=recipes,
        default=recipes[0],
        help="ONNX Runtime INT8 recipe (default: %(default)s = uint8 activations, 7-bit int8 weights: "
        "the same integers on AVX2, AVX-512 VNNI and ARM; s8s8 is what bundles <= 0.1.1 used and "
        "saturates on CPUs without VNNI; see training/README.md)",
    )


def _add_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="skip temperature scaling (default: fit one temperature on validation and fold it "
        "into the exported model, so outputs are calibrated probabilities)",
    )


def _add_bundle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bundle",
        type=Path,
        default=Path("edge_runtime/models/pneumonia-cxr"),
        help="bundle folder to (re)write (default: %(default)s)",
    )
    p.add_argument("--version", default="0.1.0", help="bundle version (default: %(default)s)")
    p.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        metavar="KEY.pem",
        help="P-256 private key (python -m training keygen) that signs the manifest; without it the "
        "bundle is unsigned and loads only where Model.RequireSignature is false",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=(
            "Train, export, quantize, evaluate and package the pneumonia chest X-ray model "
            "for the edge runtime. Every image goes through edge_runtime's decoder and "
            "preprocessing, so training sees what the device sees."
        ),
        epilog="Run 'python -m training <command> --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser(
        "pipeline",
        help="train -> export -> quantize -> ood -> evaluate -> package, in one go",
        description=(
            "Run every stage and write the bundle. Takes ~25 min on 2 CPU cores. Options can "
            "come from a TOML file (--config); flags given on the command line win over it."
        ),
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file whose keys are this command's long options (dashes or underscores), "
        "e.g. training/configs/kermany-efficientnet-lite0.toml",
    )
    _add_data(p)
    _add_run(p)
    _add_train(p)
    _add_framework(p, "pipeline")
    _add_bundle(p)
    p.add_argument("--calibration-images", type=int, default=200, help="INT8 calibration images")
    _add_recipe(p)
    _add_calibrate(p)
    p.add_argument(
        "--min-sensitivity",
        type=float,
        default=0.95,
        help="operating point: highest threshold with at least this validation sensitivity",
    )

    p = sub.add_parser(
        "train",
        help="two-stage transfer learning -> checkpoint.pt (or, --framework keras, model.keras)",
        description="Two-stage transfer learning (frozen front, stage 1 head, stage 2 last blocks, early "
        "stopping on validation AUC). --framework torch (default) trains in this environment and writes "
        "checkpoint.pt for export/quantize/package. --framework keras trains the same EfficientNet-Lite0 "
        "with TensorFlow/Keras, in TWO environments that never share a process: here (the main one) the "
        "split.json, the edge-preprocessed inputs (keras-inputs.npz) and the ported ImageNet weights are "
        "written; then .venv-keras (create it once with: bash training/keras_env.sh setup) trains, "
        "calibrates and writes model.keras + keras_train_summary.json. See training/README.md, "
        "'The Keras route'.",
    )
    _add_data(p)
    _add_run(p)
    _add_train(p)
    _add_framework(p, "train")

    p = sub.add_parser(
        "prepare",
        help="open a dataset, write the run's split.json and print its per-split table",
        description=(
            "Recognise the dataset, carve the patient-disjoint validation split (and, for the NIH "
            "subset, the test split), write split.json into --out and print images, patients and "
            "images per class for each split plus the patient-overlap check. 'train' into the same "
            "--out reuses this split when data, seed and validation fraction match."
        ),
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"dataset path, as for train (default: {_DEFAULT_DATA})",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder to write split.json into")
    p.add_argument("--seed", type=int, default=2018, help="split seed (default: %(default)s)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="validation share of the training pool (default: %(default)s)",
    )

    p = sub.add_parser(
        "export",
        help="checkpoint -> FP32 ONNX (dynamic batch), checked against PyTorch on validation "
        "(--framework keras: model.keras -> INT8 LiteRT)",
        description="Export the run's checkpoint to model.fp32.onnx (opset 17, dynamic batch axis, "
        "softmax inside) and report max |dp| and decision agreement against PyTorch on the "
        "validation split. A temperature fitted on validation is folded into the graph first "
        "(calibration.json) unless --no-calibrate.",
    )
    _add_run(p)
    _add_calibrate(p)
    p.add_argument(
        "--framework",
        choices=("torch", "keras"),
        default="torch",
        help="torch (default): checkpoint.pt -> ONNX, as above; keras: the run's model.keras -> "
        "model.int8.keras.tflite (INT8 LiteRT with probabilities, CAM heat-map and features outputs, "
        "TensorFlow's converter in .venv-keras, calibrated on training inputs) and model.fp32.onnx "
        "(tf2onnx, the same contract as the PyTorch export's), then checked here through the edge's "
        "backends; writes keras_tflite_export_summary.json and, as the PyTorch export does, "
        "calibration.json, val_predictions.npz and export_summary.json, so quantize, ood, evaluate "
        "and package follow unchanged (training/README.md, 'The Keras route')",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=None,
        help="keras only: training inputs the INT8 calibration reads (default 200)",
    )

    p = sub.add_parser(
        "quantize",
        help="FP32 ONNX -> INT8 ONNX (static, per-channel), checked against FP32 and PyTorch",
        description="Quantize model.fp32.onnx to model.int8.onnx with ONNX Runtime (static QDQ, "
        "per-channel INT8 weights, calibrated on training images only) and report max |dp| and "
        "decision agreement against FP32 and PyTorch on the validation split. For TFLite INT8 "
        "see training/tflite_env.sh.",
    )
    _add_run(p)
    p.add_argument("--calibration-images", type=int, default=200, help="INT8 calibration images")
    _add_recipe(p)

    p = sub.add_parser(
        "ood",
        help="fit the out-of-distribution check on the training split's INT8 features -> ood.npz",
        description="Run the training split (no augmentation) through the INT8 model's features "
        "output with the edge's ONNX Runtime backend, fit per-stage Mahalanobis statistics "
        "(Ledoit-Wolf covariance) and set the threshold at the 0.975 quantile of the validation "
        "scores; writes ood.npz and ood_summary.json (training/evaluate/ood.py).",
    )
    _add_run(p)

    p = sub.add_parser(
        "evaluate", help="choose the threshold on validation, then score the official test split"
    )
    _add_data(p)
    _add_run(p)
    p.add_argument("--min-sensitivity", type=float, default=0.95, help="required val sensitivity")

    p = sub.add_parser("package", help="write model.int8.onnx, MODEL_CARD.md and manifest.json")
    _add_run(p)
    _add_bundle(p)

    p = sub.add_parser(
        "keygen",
        help="write a P-256 key pair for signing bundles (development; production signs in KMS)",
        description="Write DIR/NAME.pem (private, mode 0600: keep it out of the repository) and "
        "DIR/NAME.pub.pem, and print the key fingerprint. Boxes that should run bundles signed "
        "with it list the .pub.pem file (or its text) in Model.TrustedKeys.",
    )
    p.add_argument("dir", type=Path, help="folder for the key pair")
    p.add_argument("--name", default="bundle-signing", help="file name stem (default: %(default)s)")

    from .evaluate.evaluation_report import add_report_parser

    add_report_parser(sub)
    return parser


def _weights_for(args: argparse.Namespace) -> Path | None:
    """``--weights`` as given, else the chosen model's bundled file; None for random weights."""
    if args.weights is None:
        bundled = _BUNDLED_WEIGHTS.get(args.model)
        return Path(bundled) if bundled else None
    return None if str(args.weights) == "none" else args.weights


def _augmentation(args: argparse.Namespace) -> Any:
    import dataclasses

    from .data.images import MILD_AUGMENTATION, Augmentation

    base = MILD_AUGMENTATION if args.augment == "mild" else Augmentation()
    return dataclasses.replace(base, hflip=args.hflip)


def _train_inputs(args: argparse.Namespace) -> tuple[Path | None, Path]:
    """The weights file (None: random) and the dataset the training options name, both checked."""
    weights = _weights_for(args)
    if weights is not None and not weights.is_file():
        raise SystemExit(f"error: weights file {weights} not found (pass --weights none for random)")
    data = args.data if args.data is not None else Path(_DEFAULT_DATA)
    if not data.exists():
        raise SystemExit(f"error: dataset {data} not found; pass --data")
    return weights, data


def _train_config(args: argparse.Namespace, weights: Path | None, data: Path) -> Any:
    """The training options as :class:`training.model.train.TrainConfig` (both routes record it)."""
    from .model.train import TrainConfig

    return TrainConfig(
        data_root=data,
        out_dir=args.out,
        weights=weights,
        model=args.model,
        val_fraction=args.val_fraction,
        seed=args.seed,
        cut=args.cut,
        aug_views=args.aug_views,
        batch_size=args.batch_size,
        head_epochs=args.head_epochs,
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        freeze_bn=not args.train_bn,
        label_smoothing=args.label_smoothing,
        device=args.device,
        resume=args.resume,
        augmentation=_augmentation(args),
        threads=args.threads,
        time_budget_s=args.time_budget_min * 60.0,
        limit_per_class=args.limit_per_class,
        size=args.size,
    )


def _train(args: argparse.Namespace) -> None:
    if getattr(args, "framework", "torch") == "keras":
        _train_keras(args)
        return
    if getattr(args, "max_steps", None) is not None:
        raise SystemExit("error: --max-steps applies to --framework keras only")
    from .model.train import train

    weights, data = _train_inputs(args)
    if args.size < 1:
        raise SystemExit(f"error: --size must be a positive number of pixels, got {args.size}")
    cfg = _train_config(args, weights, data)
    train(cfg)


def _keras_python() -> Path:
    """``.venv-keras``'s interpreter (``KERAS_VENV`` as in training/keras_env.sh)."""
    import os

    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("KERAS_VENV", repo / ".venv-keras")) / "bin" / "python"


def _need_keras_env() -> None:
    if not _keras_python().is_file():
        raise SystemExit(
            f"error: no Keras environment at {_keras_python().parents[1]}; create it with: "
            "bash training/keras_env.sh setup"
        )


def _run_in_keras_env(module: str, argv: list[str], doing: str, failed: str) -> None:
    """``python -m MODULE ARGV`` in ``.venv-keras`` (training/keras_env.sh), its output passed through."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    command = ["bash", str(repo / "training" / "keras_env.sh"), "python", "-m", module, *argv]
    print(f"{doing} in .venv-keras: " + " ".join(command), flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    done = subprocess.run(command, cwd=repo, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {failed} (exit status {done.returncode}); see its output above")


def _train_keras(args: argparse.Namespace) -> None:
    """``train --framework keras``: inputs, split and weights here; training in ``.venv-keras``."""
    from .run_files import KERAS_WEIGHTS_NAME

    if args.model != "efficientnet-lite0":
        raise SystemExit(f"error: --framework keras trains efficientnet-lite0 only, not {args.model}")
    if args.resume or args.device not in ("auto", "cpu"):
        raise SystemExit("error: --framework keras has no --resume and trains on TensorFlow's own device")
    if args.size < 32 or args.size % 32:
        raise SystemExit(f"error: --framework keras needs --size a multiple of 32, got {args.size}")
    _need_keras_env()
    weights, data = _train_inputs(args)
    cut = 8 if args.cut is None else args.cut
    from .keras.dataset import write_keras_inputs
    from .keras.port_weights import port_state_dict

    out = args.out.resolve()
    write_keras_inputs(
        data,
        out,
        size=args.size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        aug_views=args.aug_views,
        augmentation=_augmentation(args),
        limit_per_class=args.limit_per_class,
    )
    argv = [
        "--run",
        str(out),
        "--cut",
        str(cut),
        "--head-epochs",
        str(args.head_epochs),
        "--epochs",
        str(args.epochs),
        "--patience",
        str(args.patience),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--label-smoothing",
        str(args.label_smoothing),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--time-budget-min",
        str(args.time_budget_min),
    ]
    if weights is not None:
        npz = out / KERAS_WEIGHTS_NAME
        count = port_state_dict(weights, npz)
        print(f"weights: {count} arrays of {weights} ported to {npz}")
        argv += ["--weights-npz", str(npz)]
    if args.train_bn:
        argv.append("--train-bn")
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    _run_in_keras_env("training.keras.train", argv, "training", "Keras training failed")
    from .keras.handoff import write_train_summary

    config = {**_train_config(args, weights, data).to_json(), "cut": cut, "max_steps": args.max_steps}
    write_train_summary(out, config)


def _export_keras(args: argparse.Namespace) -> None:
    """``export --framework keras``: the INT8 LiteRT file in ``.venv-keras``, then the edge's check."""
    import json

    from .run_files import KERAS_MODEL_NAME, KERAS_TFLITE_SUMMARY

    out = args.out.resolve()
    if not args.calibrate:
        raise SystemExit(
            "error: --framework keras has no --no-calibrate: the temperature is folded in by training"
        )
    if not (out / KERAS_MODEL_NAME).is_file():
        raise SystemExit(f"error: {out / KERAS_MODEL_NAME} not found; run train --framework keras first")
    _need_keras_env()
    calibration = 200 if args.calibration_images is None else args.calibration_images
    if calibration < 1:
        raise SystemExit("error: --calibration-images must be at least 1")
    argv = ["--run", str(out), "--calibration-images", str(calibration), "--threads", str(args.threads)]
    _run_in_keras_env("training.keras.export_tflite", argv, "converting", "Keras LiteRT export failed")
    from .keras.check_litert import check_litert

    check = check_litert(out, threads=1)
    summary_path = out / KERAS_TFLITE_SUMMARY
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["edge_litert_backend"] = check
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"edge LiteRT backend on {check['images']} validation images: probabilities vs the .venv-keras "
        f"interpreter max |d| {check['probabilities_vs_keras_venv_interpreter_max_abs']:.2g}, P(positive) "
        f"vs Keras FP32 max |dp| {check['p_positive_vs_keras_fp32']['max_abs_diff']:.4f}; heat-map "
        f"{check['heatmap_shape']}, features {check['features_shape']}; summary in {summary_path}"
    )
    from .keras.handoff import write_export_files

    try:
        write_export_files(out, threads=args.threads)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None


def _prepare(args: argparse.Namespace) -> None:
    """Open the dataset, write the run's split.json and print the per-split table."""
    from .data.datasets import (
        describe,
        items_from_split,
        open_dataset,
        read_split,
        split_matches,
        write_split,
    )

    data = args.data if args.data is not None else Path(_DEFAULT_DATA)
    split_file = args.out / "split.json"
    if split_file.is_file():
        recorded = read_split(split_file)
        if split_matches(recorded, data, seed=args.seed, val_fraction=args.val_fraction):
            print(f"{split_file} already holds this split; not rewritten")
            print(describe(items_from_split(recorded)))
            return
        if (args.out / "checkpoint.pt").is_file():
            raise SystemExit(
                f"error: {args.out} holds a trained checkpoint made with another split; "
                "pass a new --out instead of overwriting its split.json"
            )
    try:
        dataset = open_dataset(data, val_fraction=args.val_fraction, seed=args.seed)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    write_split(split_file, dataset)
    print(f"wrote {split_file}")
    print(describe(dataset))


def _export(args: argparse.Namespace) -> None:
    if getattr(args, "framework", "torch") == "keras":
        _export_keras(args)
        return
    if getattr(args, "calibration_images", None) is not None and args.command == "export":
        raise SystemExit("error: export --calibration-images applies to --framework keras only")
    from .export.onnx_export import run_fp32_export

    run_fp32_export(args.out, threads=args.threads, calibrate=args.calibrate)


def _quantize(args: argparse.Namespace) -> None:
    from .export.onnx_export import run_quantize

    try:
        run_quantize(
            args.out, calibration_images=args.calibration_images, threads=args.threads, recipe=args.recipe
        )
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None


def _ood(args: argparse.Namespace) -> None:
    from .evaluate.ood import run_ood

    try:
        run_ood(args.out, threads=args.threads)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate.report import run_evaluation

    run_evaluation(args.out, args.data, min_sensitivity=args.min_sensitivity, threads=args.threads)


def _package(args: argparse.Namespace) -> None:
    from .bundle.package import package_bundle

    if args.signing_key is None:
        print(
            "warning: no --signing-key: the bundle will be unsigned and will only load where "
            "Model.RequireSignature is false (development boxes).",
            file=sys.stderr,
        )
    package_bundle(args.out, args.bundle, version=args.version, signing_key=args.signing_key)


def _keygen(args: argparse.Namespace) -> None:
    from edge_runtime.signing import generate_signing_key

    try:
        private, public, fingerprint = generate_signing_key(args.dir, args.name)
    except FileExistsError as exc:
        raise SystemExit(f"error: {exc.filename} exists; refusing to overwrite a signing key") from None
    print(f"private key: {private} (mode 0600; never commit it)")
    print(f"public key:  {public} (list it in Model.TrustedKeys)")
    print(f"fingerprint: {fingerprint}")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a pipeline TOML file into argparse defaults, refusing unknown keys and bad types.

    Values go through each option's own ``type`` (so ``out = "runs/x"`` becomes a Path), and
    a flag (``store_true``) takes a TOML boolean.
    """
    import tomllib

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"error: config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"error: config file {path} is not valid TOML: {exc}") from None
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults: dict[str, Any] = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions))
            raise SystemExit(f"error: {path}: unknown option {key!r}; known: {known}")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise SystemExit(f"error: {path}: {key} must be true or false, got {value!r}")
            defaults[dest] = value
            continue
        try:
            converted = action.type(value) if action.type and not isinstance(value, bool) else value
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"error: {path}: {key} = {value!r}: {exc}") from None
        if action.choices is not None and converted not in action.choices:
            raise SystemExit(f"error: {path}: {key} must be one of {list(action.choices)}, got {value!r}")
        defaults[dest] = converted
    return defaults


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; for ``pipeline --config F`` the file supplies the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "pipeline" and args.config is not None:
        pipeline = _subparser(parser, "pipeline")
        pipeline.set_defaults(**load_config(args.config, pipeline))
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = parse_args(argv)
    start = time.monotonic()
    if args.command == "keygen":
        _keygen(args)
        return 0
    if args.command == "prepare":
        _prepare(args)
    if args.command in ("train", "pipeline"):
        _train(args)
    if args.command in ("export", "pipeline"):
        _export(args)
    if args.command in ("quantize", "pipeline"):
        _quantize(args)
    if args.command in ("ood", "pipeline"):
        _ood(args)
    if args.command in ("evaluate", "pipeline"):
        _evaluate(args)
    if args.command in ("package", "pipeline"):
        _package(args)
    if args.command == "evaluate-report":
        from .evaluate.evaluation_report import run_from_args

        run_from_args(args)
    elapsed = time.monotonic() - start
    print(f"{args.command} finished in {elapsed / 60:.1f} min ({elapsed:.0f} s)", file=sys.stderr)
    return 0
