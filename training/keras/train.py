"""The Keras route's training step (runs ONLY in ``.venv-keras``): ``keras-inputs.npz`` -> ``model.keras``.

The schedule of the PyTorch route (:mod:`training.model.train`), as far as Keras allows:

1. The frozen front (stem + blocks ``< cut``) runs once over every cached view; the activations
   entering block ``cut`` are kept in float16.
2. Stage 1: the classifier (dropout + ``fc``) on the pooled embeddings of the frozen backbone
   (unaugmented training view), AdamW, warm-up (one epoch) + cosine, batch 128; the best
   validation-AUC epoch is kept.
3. Stage 2: blocks ``cut..`` + head convolution + ``fc`` on the cached activations, AdamW with two
   learning rates (blocks, classifier), linear warm-up + cosine, the class-weighted label-smoothed
   cross-entropy of ``torch.nn.CrossEntropyLoss(weight, label_smoothing)``, early stopping on
   validation AUC (near-ties to the lower validation log-loss), best epoch restored.
4. Temperature scaling fitted on the validation split (log-loss, as the PyTorch ``export`` stage
   does), folded into ``fc`` (``W / T``, ``b / T``); ``model.keras`` ends in a softmax, so it maps a
   normalised NHWC input (``edge_runtime.preprocess`` with the split's spec, NHWC) to calibrated
   probabilities.

BatchNorm: frozen by default, as in the PyTorch route, but the Keras way (``layer.trainable =
False``): that fixes the running statistics AND gamma/beta, whereas PyTorch keeps training
gamma/beta of the unfrozen blocks. ``--train-bn`` trains all of it in both routes.

    training/keras_env.sh python -m training.keras.train --run runs/keras \\
        --weights-npz runs/keras/imagenet-lite0.npz

Normally started by ``python -m training train --framework keras`` (training/cli.py), which first
writes the inputs (:mod:`training.keras.dataset`) and the ported weights in the main environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from ..run_files import KERAS_INPUTS_NAME, KERAS_MODEL_NAME, KERAS_SUMMARY_NAME
from .efficientnet_lite import HEAD_CHANNELS, build_efficientnet_lite0
from .inputs import KerasInputs, read_inputs
from .scores import fit_temperature, log_loss, roc_auc

__all__ = ["KerasTrainConfig", "train"]

#: Validation AUCs closer than this count as equal; the lower log-loss then wins (PyTorch route's).
AUC_TIE = 2e-4
HEAD_BATCH = 128


class KerasTrainConfig(argparse.Namespace):
    """The parsed options (see :func:`build_parser`)."""

    run: Path
    weights_npz: Path | None
    cut: int
    head_epochs: int
    head_lr: float
    epochs: int
    patience: int
    lr: float
    classifier_lr: float
    weight_decay: float
    warmup_steps: int
    batch_size: int
    eval_batch_size: int
    label_smoothing: float
    train_bn: bool
    max_steps: int | None
    seed: int
    threads: int
    time_budget_min: float


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """``base * _cosine(step, total, warmup)`` of the PyTorch route (linear warm-up, then cosine to 0)."""

    def __init__(self, base: float, total: int, warmup: int) -> None:
        self.base, self.total, self.warmup = float(base), int(total), int(warmup)

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        warm = (step + 1.0) / float(max(self.warmup, 1))
        progress = ops.minimum(1.0, (step - float(self.warmup)) / float(max(1, self.total - self.warmup)))
        cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
        return self.base * ops.where(step < float(self.warmup), warm, cosine)

    def get_config(self) -> dict[str, Any]:
        return {"base": self.base, "total": self.total, "warmup": self.warmup}


def _adamw(base: float, total: int, warmup: int, weight_decay: float) -> keras.optimizers.AdamW:
    # epsilon 1e-8: torch.optim.AdamW's (Keras's default is 1e-7).
    return keras.optimizers.AdamW(
        learning_rate=WarmupCosine(base, total, warmup), weight_decay=weight_decay, epsilon=1e-8
    )


def class_weights(labels: np.ndarray, classes: int) -> np.ndarray:
    """``N / (classes * n_c)``: each class contributes equally to the loss (the PyTorch route's)."""
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    return (labels.size / (classes * np.maximum(counts, 1.0))).astype(np.float32)


def weighted_cross_entropy(logits: Any, labels: Any, weights: Any, smoothing: float) -> Any:
    """``torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=smoothing)`` (mean reduction)."""
    log_p = tf.nn.log_softmax(logits, axis=-1)
    true_nll = -tf.gather(log_p, labels, batch_dims=1)
    true_weight = tf.gather(weights, labels)
    classes = tf.cast(tf.shape(logits)[-1], log_p.dtype)
    smooth = -tf.reduce_sum(log_p * weights[None, :], axis=-1) / classes
    per_sample = (1.0 - smoothing) * true_weight * true_nll + smoothing * smooth
    return tf.reduce_sum(per_sample) / tf.reduce_sum(true_weight)


def _better(auc: float, nll: float, best_auc: float, best_nll: float) -> bool:
    if auc > best_auc + AUC_TIE:
        return True
    return auc >= best_auc - AUC_TIE and nll < best_nll


def _softmax_positive(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted.astype(np.float64))
    return (e[:, 1] / e.sum(axis=1)).astype(np.float64)


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _run(fn: Any, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate(
        [np.asarray(fn(tf.constant(np.asarray(x[s], np.float32)))) for s in _batches(len(x), batch)]
    )


def _frozen_activations(prefix: Any, data: KerasInputs, split: str, batch: int) -> np.ndarray:
    """``(views, N, H, W, C)`` float16 activations entering block ``cut``."""
    views = data.views if split == "train" else 1
    n = len(data.train_labels if split == "train" else data.val_labels)
    out: np.ndarray | None = None
    for view in range(views):
        for s in _batches(n, batch):
            x = data.samples(split, view, np.arange(s.start, s.stop))
            h = np.asarray(prefix(tf.constant(x)), dtype=np.float16)
            if out is None:
                out = np.empty((views, n, *h.shape[1:]), dtype=np.float16)
            out[view, s] = h
    assert out is not None
    return out


def _steps(n: int, batch: int, max_steps: int | None) -> int:
    steps = math.ceil(n / batch)
    return steps if max_steps is None else max(1, min(steps, max_steps))


def train(cfg: KerasTrainConfig) -> dict[str, Any]:
    """Train and calibrate; save ``model.keras`` and ``keras_train_summary.json`` in ``cfg.run``.

    Returns the summary.
    """
    t_start = time.monotonic()
    deadline = t_start + cfg.time_budget_min * 60.0
    keras.utils.set_random_seed(cfg.seed)
    run = Path(cfg.run)
    data = read_inputs(run / KERAS_INPUTS_NAME)
    if len(data.classes) != 2:
        raise ValueError(f"the Keras route trains two classes; the inputs have {data.classes}")
    if data.input_shape[2] != 3:
        raise ValueError(f"EfficientNet-Lite0 takes 3 channels; the spec gives {data.input_shape[2]}")
    y_train, y_val = data.train_labels, data.val_labels
    n_train, n_val = len(y_train), len(y_val)
    print(
        f"inputs: train {n_train} x {data.views} views, val {n_val}, {data.input_shape} NHWC "
        f"(from {run / KERAS_INPUTS_NAME})"
    )

    # 1. model, frozen front, cached activations.
    t0 = time.monotonic()
    if cfg.weights_npz is None:
        print("weights: NONE given -> Keras random initialisation of the whole network (no ImageNet start)")
    else:
        print(f"weights: ImageNet backbone from {cfg.weights_npz}; fresh 2-class 'fc'")
    model = build_efficientnet_lite0(num_classes=2, input_shape=data.input_shape, weights_npz=cfg.weights_npz)
    cut_tensor = model.get_layer(f"blocks_{cfg.cut}_expand_conv").input
    prefix = keras.Model(model.input, cut_tensor, name="frozen_front")
    suffix = keras.Model(cut_tensor, model.output, name="trainable_back")
    embed = keras.Model(cut_tensor, model.get_layer("avg_pooling").output, name="embedding")
    pooled = keras.Input((HEAD_CHANNELS,), name="pooled")
    head = keras.Model(pooled, model.get_layer("fc")(model.get_layer("dropout")(pooled)), name="classifier")
    prefix_fn = tf.function(lambda x: prefix(x, training=False), reduce_retracing=True)
    train_acts = _frozen_activations(prefix_fn, data, "train", cfg.eval_batch_size)
    val_acts = _frozen_activations(prefix_fn, data, "val", cfg.eval_batch_size)[0]
    mib = (train_acts.nbytes + val_acts.nbytes) / 2**20
    print(f"cached activations entering block {cfg.cut}: {train_acts.shape} float16, {mib:.0f} MiB")
    t_frozen = time.monotonic() - t0

    weights = tf.constant(class_weights(y_train, 2))

    def loss_fn(logits: Any, labels: Any) -> Any:
        return weighted_cross_entropy(logits, labels, weights, cfg.label_smoothing)

    # 2. stage 1: the classifier on pooled embeddings of the frozen backbone.
    t0 = time.monotonic()
    embed_fn = tf.function(lambda x: embed(x, training=False), reduce_retracing=True)
    train_feats = _run(embed_fn, train_acts[0], cfg.eval_batch_size)
    val_feats = _run(embed_fn, val_acts, cfg.eval_batch_size)
    head_vars = head.trainable_variables
    steps1 = _steps(n_train, HEAD_BATCH, cfg.max_steps)
    opt1 = _adamw(cfg.head_lr, steps1 * cfg.head_epochs, steps1, cfg.weight_decay)
    opt1.build(head_vars)

    @tf.function(reduce_retracing=True)
    def head_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(head(x, training=True), y)
        opt1.apply_gradients(zip(tape.gradient(loss, head_vars), head_vars, strict=True))
        return loss

    head_predict = tf.function(lambda x: head(x, training=False), reduce_retracing=True)
    rng = np.random.default_rng(cfg.seed + 1)
    best1, best1_weights, history1 = -1.0, head.get_weights(), []
    for epoch in range(cfg.head_epochs):
        order = rng.permutation(n_train)
        losses = []
        for step in range(steps1):
            idx = order[step * HEAD_BATCH : (step + 1) * HEAD_BATCH]
            losses.append(float(head_step(tf.constant(train_feats[idx]), tf.constant(y_train[idx]))))
        auc = roc_auc(y_val, _softmax_positive(_run(head_predict, val_feats, cfg.eval_batch_size)))
        history1.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_auc": auc})
        if auc > best1 or (epoch == 0 and math.isnan(auc)):
            best1, best1_weights = auc, head.get_weights()
    head.set_weights(best1_weights)
    t_stage1 = time.monotonic() - t0
    print(f"stage 1: frozen backbone + trained head ({cfg.head_epochs} epochs), val AUC {best1:.4f}")

    # 3. stage 2: blocks >= cut + head conv + fc on the cached activations.
    t0 = time.monotonic()
    for layer in model.layers:
        layer.trainable = True
    for layer in prefix.layers:
        layer.trainable = False
    if not cfg.train_bn:
        for layer in suffix.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
    fc = model.get_layer("fc")
    classifier_vars = list(fc.trainable_variables)
    classifier_ids = {id(v) for v in classifier_vars}
    block_vars = [v for v in suffix.trainable_variables if id(v) not in classifier_ids]
    steps2 = _steps(n_train, cfg.batch_size, cfg.max_steps)
    total2 = steps2 * cfg.epochs
    warmup2 = min(cfg.warmup_steps, total2 // 4)
    opt_blocks = _adamw(cfg.lr, total2, warmup2, cfg.weight_decay)
    opt_fc = _adamw(cfg.classifier_lr, total2, warmup2, cfg.weight_decay)
    opt_blocks.build(block_vars)
    opt_fc.build(classifier_vars)
    all_vars = block_vars + classifier_vars

    @tf.function(reduce_retracing=True)
    def train_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(suffix(x, training=True), y)
        grads = tape.gradient(loss, all_vars)
        opt_blocks.apply_gradients(zip(grads[: len(block_vars)], block_vars, strict=True))
        opt_fc.apply_gradients(zip(grads[len(block_vars) :], classifier_vars, strict=True))
        return loss

    suffix_predict = tf.function(lambda x: suffix(x, training=False), reduce_retracing=True)
    rng = np.random.default_rng(cfg.seed + 2)
    views = train_acts.shape[0]
    best_auc, best_nll, best_epoch, stale = -1.0, math.inf, 0, 0
    best_weights = suffix.get_weights()
    history2: list[dict[str, float]] = []
    print(
        f"stage 2: {len(block_vars)} block/head-conv variables + fc, {steps2} step(s)/epoch, "
        f"max {cfg.epochs} epoch(s), warm-up {warmup2} step(s), BatchNorm "
        f"{'trained' if cfg.train_bn else 'frozen'}"
    )
    for epoch in range(cfg.epochs):
        if history2 and time.monotonic() + max(h["seconds"] for h in history2) > deadline:
            print(f"  time budget ({cfg.time_budget_min} min) reached: stopping before epoch {epoch + 1}")
            break
        t_epoch = time.monotonic()
        order = rng.permutation(n_train)
        view_of = rng.integers(0, views, size=n_train)
        losses = []
        for step in range(steps2):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = tf.constant(train_acts[view_of[idx], idx].astype(np.float32))  # float16 cache -> float32
            losses.append(float(train_step(x, tf.constant(y_train[idx]))))
        probs = _softmax_positive(_run(suffix_predict, val_acts, cfg.eval_batch_size))
        auc, nll = roc_auc(y_val, probs), log_loss(y_val, probs)
        improved = _better(auc, nll, best_auc, best_nll) or (epoch == 0 and math.isnan(auc))
        if improved:
            best_auc, best_nll, best_epoch, stale = auc, nll, epoch + 1, 0
            best_weights = suffix.get_weights()
        else:
            stale += 1
        seconds = time.monotonic() - t_epoch
        history2.append(
            {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                "val_auc": auc,
                "val_log_loss": nll,
                "steps": steps2,
                "seconds": seconds,
            }
        )
        print(
            f"  epoch {epoch + 1}: loss {np.mean(losses):.4f}  val AUC {auc:.4f}  log-loss {nll:.4f}"
            f"{'  (best)' if improved else ''}  {seconds:.1f} s"
        )
        if stale >= cfg.patience:
            print(f"  early stop: no val-AUC (or tie + log-loss) gain for {cfg.patience} epochs")
            break
    suffix.set_weights(best_weights)
    t_stage2 = time.monotonic() - t0

    # 4. temperature scaling on validation, folded into fc; softmax appended for the saved model.
    logits = _run(suffix_predict, val_acts, cfg.eval_batch_size).astype(np.float64)
    margin = logits[:, 1] - logits[:, 0]
    temperature = fit_temperature(y_val, margin)
    before = 1.0 / (1.0 + np.exp(-margin))
    after = 1.0 / (1.0 + np.exp(-margin / temperature))
    kernel, bias = fc.get_weights()
    fc.set_weights([kernel / np.float32(temperature), bias / np.float32(temperature)])
    calibrated = keras.Model(
        model.input, layers.Softmax(name="probabilities")(model.output), name="efficientnet_lite0_calibrated"
    )
    model_path = run / KERAS_MODEL_NAME
    calibrated.save(model_path)
    # The saved model on full images against the cached path (float16 activations) on a few images.
    check = min(n_val, 16)
    full = np.asarray(calibrated(data.samples("val", 0, np.arange(check)), training=False))
    cached = _softmax_positive(_run(suffix_predict, val_acts[:check], cfg.eval_batch_size))
    full_vs_cached = float(np.abs(full[:, 1] - cached).max())
    print(
        f"calibration: T = {temperature:.4f}; val log-loss {log_loss(y_val, before):.4f} -> "
        f"{log_loss(y_val, after):.4f}; saved {model_path} (softmax output; full model vs cached "
        f"activations max |dp| {full_vs_cached:.2g} on {check} val images)"
    )

    wall = time.monotonic() - t_start
    summary = {
        "framework": "keras",
        "model": "efficientnet-lite0",
        "cut": cfg.cut,
        "weights": None if cfg.weights_npz is None else str(cfg.weights_npz),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "data": {
            "train_images": n_train,
            "val_images": n_val,
            "views_per_train_image": data.views,
            "classes": data.classes,
            "spec": data.spec,
            "input_layout": "NHWC",
        },
        "stage1": {"val_auc": best1, "epochs": len(history1), "steps_per_epoch": steps1, "history": history1},
        "stage2": {
            "best_val_auc": best_auc,
            "best_val_log_loss": best_nll,
            "best_epoch": best_epoch,
            "epochs_run": len(history2),
            "steps_per_epoch": steps2,
            "seconds_per_epoch": float(np.mean([h["seconds"] for h in history2])) if history2 else None,
            "history": history2,
        },
        "calibration": {
            "temperature": temperature,
            "method": "temperature scaling fitted by log-loss on the validation split, folded into fc "
            "(softmax((Wx+b)/T))",
            "val_auc": {"before": roc_auc(y_val, before), "after": roc_auc(y_val, after)},
            "val_log_loss": {"before": log_loss(y_val, before), "after": log_loss(y_val, after)},
        },
        "saved_model": {
            "path": str(model_path),
            "input": f"NHWC float32 {list(data.input_shape)}, normalised with the split's spec",
            "output": "softmax probabilities, classes in the order of 'data.classes'",
            "full_vs_cached_max_abs_dp": full_vs_cached,
        },
        "seconds": {"frozen_prefix": t_frozen, "stage1": t_stage1, "stage2": t_stage2, "total": wall},
        "environment": {
            "python": platform.python_version(),
            **{name: importlib.metadata.version(name) for name in ("tensorflow-cpu", "keras", "numpy")},
            "keras_backend": keras.backend.backend(),
            "threads": cfg.threads,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    (run / KERAS_SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"Keras training took {wall:.0f} s (frozen prefix {t_frozen:.0f} s, stage 1 {t_stage1:.0f} s, "
        f"stage 2 {t_stage2:.0f} s); best val AUC {best_auc:.4f} (epoch {best_epoch}); T {temperature:.3f}"
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training/keras_env.sh python -m training.keras.train",
        description="Two-stage transfer learning of EfficientNet-Lite0 in Keras on a run's keras-inputs.npz "
        "(written in the main environment by training.keras.dataset); writes model.keras and "
        "keras_train_summary.json.",
    )
    p.add_argument("--run", type=Path, required=True, help="run folder holding keras-inputs.npz")
    p.add_argument(
        "--weights-npz", type=Path, default=None, help="ported ImageNet weights (default: random init)"
    )
    p.add_argument("--cut", type=int, default=8, help="first trainable block (default: %(default)s of 16)")
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--head-lr", type=float, default=3e-3)
    p.add_argument("--epochs", type=int, default=10, help="stage-2 maximum epochs")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4, help="stage-2 learning rate of the blocks")
    p.add_argument("--classifier-lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--train-bn", action="store_true", help="train BatchNorm in stage 2 (default: frozen)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="cap on optimizer steps per epoch in both stages (tests)"
    )
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-budget-min", type=float, default=20.0)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv, namespace=KerasTrainConfig())
    tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
