"""Two-stage transfer learning sized for a 2-core CPU.

One training step of EfficientNet-Lite0 on a batch of 32 224-px images takes
about 3 s on this class of machine, so end-to-end fine-tuning for several
epochs would take hours. Instead:

1. Every image is decoded and preprocessed once with the edge code into an
   8-bit in-memory cache (:class:`~training.data.images.ImageCache`), optionally with
   a few augmented views per training image.
2. The frozen front of the network (stem + blocks ``< cut``) runs once per
   cached view; the activations entering block ``cut`` are kept in float16.
3. Stage 1 trains only the classifier on pooled embeddings of the frozen
   backbone (seconds), which gives stage 2 a sensible starting head.
4. Stage 2 trains blocks ``cut..`` + head conv + classifier on the cached
   activations with AdamW, a warm-up + cosine schedule, a class-weighted
   loss and early stopping on validation AUC. The number of epochs is
   capped from a timing probe so the run stays inside its time budget.

BatchNorm statistics stay frozen by default: the trainable blocks see
mini-batches of 32 from a small dataset, and TF-ported EfficientNets use a
momentum of 0.01, so running statistics would lag the weights badly.

The validation split is patient-disjoint and carved from the official
training split; the official test split is never touched here.

Why one module over 500 lines: both stages share the image cache, the frozen-front
activations, the timing probe and the resumable state; split apart they would pass
all of it back and forth. (Issue 13 leaves a split at the stage-1/stage-2 seam open.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edge_runtime.preprocess import PreprocessSpec

from ..data.datasets import open_run_split
from ..data.images import (
    LABELS,
    Augmentation,
    CXRDataset,
    ImageCache,
    label_counts,
)
from ..evaluate.metrics import roc_auc
from ..run_files import CHECKPOINT_NAME, RESUME_NAME, SUMMARY_NAME
from .models import StagedModel, build_model, default_cut, staged_view

__all__ = ["TrainConfig", "load_checkpoint", "seed_everything", "train"]


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the run folder).

    Attributes:
        data_root: Any path :func:`training.data.datasets.open_dataset` recognises
            (Kermany folder, ``nih1000_64``, PneumoniaMNIST ``.npz``, NIH subset).
        out_dir: Run folder for the checkpoint, split and summary.
        weights: ImageNet weights for the backbone (None: random init).
        model: Registry name (see :func:`training.model.models.available_models`).
        val_fraction: Share of training images moved to validation.
        seed: Seeds the split, augmentation, shuffling and initialisation.
        cut: First trainable block; None takes the registry's default.
        aug_views: Augmented views cached per training image (0 = none).
        batch_size: Stage-2 mini-batch.
        eval_batch_size: Batch for frozen passes and validation.
        head_epochs: Stage-1 epochs (classifier only, on pooled embeddings).
        head_lr: Stage-1 learning rate.
        epochs: Stage-2 maximum epochs (the time budget may lower it).
        patience: Stage-2 epochs without a validation-AUC gain before stopping.
        lr: Stage-2 learning rate of the unfrozen blocks.
        classifier_lr: Stage-2 learning rate of the classifier.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up before the cosine decay.
        freeze_bn: Keep BatchNorm running statistics fixed in stage 2.
        label_smoothing: Cross-entropy label smoothing. Kermany training
            images are easy for a pretrained CNN (validation AUC ~0.999), so
            without it the network drives its outputs to 0/1 and becomes
            over-confident on films from other sites and years.
        augmentation: Strengths of the augmented views (see
            :class:`training.data.images.Augmentation`).
        threads: torch intra-op threads (the machine has 2 cores).
        device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda[:N]``.
        resume: Continue stage 2 from the last completed epoch saved in
            ``out_dir`` (``stage2_resume.pt``) instead of starting over; the
            decode and frozen passes are recomputed (they are deterministic).
        time_budget_s: Wall-clock budget of the whole ``train`` call.
        limit_per_class: Use at most this many training images per class
            (smoke tests only; the split is computed on the limited list).
        spec: Preprocessing spec written into the bundle.
        size: Square network input in pixels; None keeps ``spec``'s size.
            Sets ``spec``'s height and width, and shrinking ``area``
            interpolation becomes ``linear`` when the training images are
            smaller (see :func:`training.data.datasets.spec_for_size`).
    """

    data_root: Path
    out_dir: Path
    weights: Path | None = None
    model: str = "efficientnet-lite0"
    val_fraction: float = 0.15
    seed: int = 2018
    cut: int | None = None
    aug_views: int = 1
    batch_size: int = 32
    eval_batch_size: int = 64
    head_epochs: int = 30
    head_lr: float = 3e-3
    epochs: int = 10
    patience: int = 3
    lr: float = 3e-4
    classifier_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    freeze_bn: bool = True
    label_smoothing: float = 0.1
    augmentation: Augmentation = field(default_factory=Augmentation)
    threads: int = 2
    device: str = "auto"
    resume: bool = False
    time_budget_s: float = 20 * 60.0
    limit_per_class: int | None = None
    spec: PreprocessSpec = field(default_factory=PreprocessSpec)
    size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (paths as strings, spec as its dict)."""
        data = asdict(self)
        for key in ("data_root", "out_dir", "weights"):
            data[key] = None if data[key] is None else str(data[key])
        data["spec"] = self.spec.to_dict()
        data["augmentation"] = self.augmentation.to_dict()
        return data


def seed_everything(seed: int) -> None:
    """Seed torch and numpy so two runs with one config give the same model."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # for third-party code that uses the global RNG


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable once per process
        torch.set_num_interop_threads(1)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # Depthwise convolutions run about 2x faster in channels-last on x86 CPUs.
    return x.contiguous(memory_format=torch.channels_last)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is present, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _input(staged: StagedModel, x: torch.Tensor) -> torch.Tensor:
    """A cached CPU batch as float32 on the model's device, channels-last."""
    device = next(staged.model.parameters()).device
    return _channels_last(x.to(device, non_blocking=True).float())


@torch.inference_mode()
def _frozen_activations(
    staged: StagedModel, cache: ImageCache, cut: int, batch_size: int, desc: str
) -> torch.Tensor:
    """Run the frozen prefix over every cached view: ``(views, N, C, H, W)`` float16."""
    staged.model.eval()
    n = len(cache)
    out: torch.Tensor | None = None
    with tqdm(total=n * cache.views, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for view in range(cache.views):
            for start in range(0, n, batch_size):
                idx = np.arange(start, min(n, start + batch_size))
                h = staged.prefix(_input(staged, torch.from_numpy(cache.batch(idx, view))), cut)
                if out is None:
                    out = torch.empty((cache.views, n, *h.shape[1:]), dtype=torch.float16)
                out[view, start : start + len(idx)] = h.to("cpu", torch.float16)
                bar.update(len(idx))
    assert out is not None
    return out


@torch.inference_mode()
def _embeddings(staged: StagedModel, acts: torch.Tensor, cut: int, batch_size: int) -> torch.Tensor:
    """Pooled embeddings ``(N, D)`` of cached activations ``(N, C, H, W)`` (eval mode)."""
    staged.model.eval()
    parts = [
        staged.features(_input(staged, acts[i : i + batch_size]), cut)
        for i in range(0, acts.shape[0], batch_size)
    ]
    return torch.cat(parts)


@torch.inference_mode()
def _predict(staged: StagedModel, acts: torch.Tensor, cut: int, batch_size: int) -> np.ndarray:
    """P(positive) for cached activations, eval mode."""
    staged.model.eval()
    probs = []
    for i in range(0, acts.shape[0], batch_size):
        feats = staged.features(_input(staged, acts[i : i + batch_size]), cut)
        probs.append(torch.softmax(staged.classifier(feats), dim=1)[:, 1].cpu())
    return torch.cat(probs).numpy()


#: Validation AUCs closer than this count as equal; the lower validation log-loss then wins.
AUC_TIE = 2e-4


def _log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-7)."""
    p = np.clip(np.where(labels == 1, probs, 1.0 - probs), 1e-7, 1.0)
    return float(-np.mean(np.log(p)))


def _better(auc: float, nll: float, best_auc: float, best_nll: float) -> bool:
    """Early-stopping order: validation AUC first; near-ties (the Kermany validation split
    saturates at AUC ~0.999) go to the better-calibrated epoch (lower log-loss)."""
    if auc > best_auc + AUC_TIE:
        return True
    return auc >= best_auc - AUC_TIE and nll < best_nll


def _class_weights(labels: np.ndarray) -> torch.Tensor:
    """``N / (classes * n_c)``: each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=len(LABELS)).astype(np.float64)
    weights = labels.size / (len(LABELS) * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_head(
    staged: StagedModel,
    train_feats: torch.Tensor,
    train_labels: np.ndarray,
    val_feats: torch.Tensor,
    val_labels: np.ndarray,
    cfg: TrainConfig,
    loss_fn: nn.Module,
) -> tuple[float, list[dict[str, float]]]:
    """Stage 1: fit the classifier on frozen embeddings; keep the best-AUC epoch."""
    head = staged.classifier_module()
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    batch = 128
    n = train_feats.shape[0]
    steps_per_epoch = math.ceil(n / batch)
    total = steps_per_epoch * cfg.head_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, total, steps_per_epoch))
    y = torch.from_numpy(train_labels).to(train_feats.device)
    rng = np.random.default_rng(cfg.seed + 1)
    best_auc, best_state, history = -1.0, copy.deepcopy(head.state_dict()), []
    bar = tqdm(range(cfg.head_epochs), desc="stage 1 (head)", unit="ep", dynamic_ncols=True)
    for epoch in bar:
        staged.model.train()
        order = torch.from_numpy(rng.permutation(n)).to(train_feats.device)
        total_loss = 0.0
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            loss = loss_fn(staged.classifier(train_feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        staged.model.eval()
        with torch.inference_mode():
            probs = torch.softmax(staged.classifier(val_feats), dim=1)[:, 1].cpu().numpy()
        auc = roc_auc(val_labels, probs)
        history.append({"epoch": epoch + 1, "loss": total_loss / n, "val_auc": auc})
        if auc > best_auc:
            best_auc, best_state = auc, copy.deepcopy(head.state_dict())
        bar.set_postfix(loss=f"{total_loss / n:.4f}", val_auc=f"{auc:.4f}", best=f"{best_auc:.4f}")
    head.load_state_dict(best_state)
    return best_auc, history


def _set_train_mode(staged: StagedModel, freeze_bn: bool) -> None:
    staged.model.train()
    if freeze_bn:
        for module in staged.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _finetune(
    staged: StagedModel,
    train_acts: torch.Tensor,
    train_labels: np.ndarray,
    val_acts: torch.Tensor,
    val_labels: np.ndarray,
    cfg: TrainConfig,
    cut: int,
    loss_fn: nn.Module,
    deadline: float,
    resume_state: dict[str, Any] | None = None,
    stage1: tuple[float, list[dict[str, float]]] = (float("nan"), []),
) -> dict[str, Any]:
    """Stage 2: train blocks ``cut..`` + head on cached activations, early-stopped on val AUC.

    After every epoch the whole stage-2 state (weights, optimizer, schedule,
    RNG, best epoch so far) goes to ``out_dir/stage2_resume.pt``, so a killed
    run continues with ``resume=True`` where it stopped.
    """
    model = staged.model
    for p in model.parameters():
        p.requires_grad_(False)
    block_params = [p for m in staged.trainable_modules(cut) for p in m.parameters()]
    head_params = list(staged.classifier_module().parameters())
    for p in block_params + head_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        [
            {"params": block_params, "lr": cfg.lr},
            {"params": head_params, "lr": cfg.classifier_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    views, n = train_acts.shape[0], train_acts.shape[1]
    y = torch.from_numpy(train_labels)
    rng = np.random.default_rng(cfg.seed + 2)
    steps_per_epoch = math.ceil(n / cfg.batch_size)

    def step_batch(idx: np.ndarray, view_idx: np.ndarray) -> torch.Tensor:
        x = _input(staged, train_acts[torch.from_numpy(view_idx), torch.from_numpy(idx)])
        logits = staged.classifier(staged.features(x, cut))
        return loss_fn(logits, y[torch.from_numpy(idx)].to(x.device))

    # Timing probe: forward+backward of a few batches (gradients discarded), one eval batch.
    _set_train_mode(staged, cfg.freeze_bn)
    probe_times = []
    for _ in range(4):
        idx = rng.choice(n, size=min(cfg.batch_size, n), replace=False)
        t0 = time.perf_counter()
        step_batch(idx, np.zeros_like(idx)).backward()
        probe_times.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    _predict(staged, val_acts[: cfg.eval_batch_size], cut, cfg.eval_batch_size)
    eval_batch_s = time.perf_counter() - t0
    step_s = float(np.median(probe_times[1:]))
    epoch_s = (
        steps_per_epoch * step_s * 1.05 + math.ceil(val_acts.shape[0] / cfg.eval_batch_size) * eval_batch_s
    )
    remaining = deadline - time.monotonic()
    affordable = int(remaining // epoch_s)
    epochs = max(1, min(cfg.epochs, affordable))
    tqdm.write(
        f"stage 2: {step_s:.2f} s/step x {steps_per_epoch} steps + validation = "
        f"~{epoch_s:.0f} s/epoch; {remaining:.0f} s left in the budget -> {epochs} epoch(s) "
        f"(max {cfg.epochs})"
    )
    first_plan = epochs
    # Mutable so the schedule can be shortened if the machine turns out slower than probed.
    plan = {"total_steps": epochs * steps_per_epoch}
    warmup = min(cfg.warmup_steps, plan["total_steps"] // 4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, plan["total_steps"], warmup))

    best_auc, best_nll, best_epoch = -1.0, math.inf, 0
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    stale = 0
    epoch = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        rng.bit_generator.state = resume_state["rng"]
        torch.set_rng_state(resume_state["torch_rng"])
        if resume_state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume_state["cuda_rng"])
        epochs, first_plan = resume_state["epochs"], resume_state["first_plan"]
        plan["total_steps"] = resume_state["total_steps"]
        sched.load_state_dict(resume_state["scheduler"])
        best_auc, best_nll, best_epoch = resume_state["best"]
        best_state, stale = resume_state["best_state"], resume_state["stale"]
        history = resume_state["history"]
        epoch = resume_state["epoch"]
    resume_path = Path(cfg.out_dir) / RESUME_NAME
    while epoch < epochs:
        t_epoch = time.perf_counter()
        _set_train_mode(staged, cfg.freeze_bn)
        order = rng.permutation(n)
        view_of = rng.integers(0, views, size=n)
        running, seen = 0.0, 0
        bar = tqdm(
            range(0, n, cfg.batch_size),
            desc=f"stage 2 epoch {epoch + 1}/{epochs}",
            unit="batch",
            dynamic_ncols=True,
        )
        for i in bar:
            idx = order[i : i + cfg.batch_size]
            loss = step_batch(idx, view_of[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{running / seen:.4f}", best_val_auc=f"{max(best_auc, 0):.4f}")
        probs = _predict(staged, val_acts, cut, cfg.eval_batch_size)
        auc = roc_auc(val_labels, probs)
        nll = _log_loss(val_labels, probs)
        improved = _better(auc, nll, best_auc, best_nll)
        if improved:
            best_auc, best_nll, best_epoch, stale = auc, nll, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        history.append(
            {
                "epoch": epoch + 1,
                "loss": running / seen,
                "val_auc": auc,
                "val_log_loss": nll,
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t_epoch,
            }
        )
        bar.close()
        tqdm.write(
            f"  epoch {epoch + 1}: loss {running / seen:.4f}  val AUC {auc:.4f}  log-loss {nll:.4f}"
            f"{'  (best)' if improved else ''}  {time.perf_counter() - t_epoch:.0f} s"
        )
        if stale >= cfg.patience:
            tqdm.write(f"  early stop: no val-AUC (or tie + log-loss) gain for {cfg.patience} epochs")
            break
        epoch += 1
        _save_resume(
            resume_path,
            cfg,
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),  # dropout / drop-connect draws
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "epochs": epochs,
                "first_plan": first_plan,
                "total_steps": plan["total_steps"],
                "best": (best_auc, best_nll, best_epoch),
                "best_state": best_state,
                "stale": stale,
                "history": history,
                "stage1_auc": stage1[0],
                "stage1_history": stage1[1],
            },
        )
        # Re-plan from the measured epoch time (other jobs may share the CPU): shorten the
        # cosine schedule rather than stop half-way with the learning rate still high.
        epoch_s = max(h["seconds"] for h in history)
        affordable = max(epoch, epoch + int((deadline - time.monotonic()) // epoch_s))
        if affordable < epochs:
            epochs = affordable
            plan["total_steps"] = epochs * steps_per_epoch
            tqdm.write(
                f"  re-planned: epochs take ~{epoch_s:.0f} s, so {epochs} epoch(s) fit the budget; "
                "the cosine schedule is shortened to end there"
            )
    model.load_state_dict(best_state)
    return {
        "best_val_auc": best_auc,
        "best_val_log_loss": best_nll,
        "best_epoch": best_epoch,
        "epochs_planned": first_plan,
        "epochs_final_plan": epochs,
        "epochs_run": len(history),
        "step_seconds": step_s,
        "history": history,
    }


def _resume_key(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a saved stage-2 state must share with the run that resumes it."""
    data = cfg.to_json()
    for volatile in ("resume", "time_budget_s", "threads", "device", "out_dir", "eval_batch_size"):
        data.pop(volatile, None)
    return data


def _save_resume(path: Path, cfg: TrainConfig, state: dict[str, Any]) -> None:
    """Write the stage-2 state atomically (a crash mid-write keeps the previous epoch's)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"key": _resume_key(cfg), **state}, tmp)
    os.replace(tmp, path)


def _load_resume(out: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The saved stage-2 state of this run, or None (with the reason) when there is none to use."""
    path = out / RESUME_NAME
    if not path.is_file():
        tqdm.write(f"resume: no {path} yet, training from the start")
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("key") != _resume_key(cfg):
        raise ValueError(
            f"{path} was saved by a run with different settings; resume with the same options, "
            "or delete the file (or use a new --out) to start over."
        )
    return state


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole training; write checkpoint, split and summary into ``cfg.out_dir``.

    Returns:
        The summary dict (also written as ``train_summary.json``).
    """
    t_start = time.monotonic()
    deadline = t_start + cfg.time_budget_s
    _set_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # An existing split.json for the same data, seed and fractions (e.g. from `prepare`) is reused.
    dataset, spec = open_run_split(
        out,
        cfg.data_root,
        cfg.spec,
        size=cfg.size,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        limit_per_class=cfg.limit_per_class,
        say=tqdm.write,
    )
    cfg = replace(cfg, spec=spec)
    classes = dataset.classes
    train_items, val_items = list(dataset.train), list(dataset.val)

    # 1. decode + preprocess once.
    t0 = time.monotonic()
    views = 1 + cfg.aug_views
    train_ds = CXRDataset(train_items, cfg.spec, augment=True, seed=cfg.seed, augmentation=cfg.augmentation)
    val_ds = CXRDataset(val_items, cfg.spec)
    train_cache = ImageCache.build(
        train_ds, views, lambda it: tqdm(it, desc="decode train", total=len(train_ds) * views)
    )
    val_cache = ImageCache.build(val_ds, 1, lambda it: tqdm(it, desc="decode val", total=len(val_ds)))
    t_decode = time.monotonic() - t0

    # 2. frozen prefix once.
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(classes), cfg.weights)
    device = resolve_device(cfg.device)
    model = model.to(device=device, memory_format=torch.channels_last)
    staged = staged_view(cfg.model, model)
    cut = default_cut(cfg.model) if cfg.cut is None else cfg.cut
    train_acts = _frozen_activations(staged, train_cache, cut, cfg.eval_batch_size, "frozen train")
    val_acts = _frozen_activations(staged, val_cache, cut, cfg.eval_batch_size, "frozen val")[0]
    act_mb = (train_acts.numel() + val_acts.numel()) * 2 / 2**20
    tqdm.write(f"cached activations entering block {cut}: {tuple(train_acts.shape)}, {act_mb:.0f} MiB")
    t_frozen = time.monotonic() - t0

    train_labels = train_cache.labels
    val_labels = val_cache.labels
    loss_fn = nn.CrossEntropyLoss(
        weight=_class_weights(train_labels).to(device), label_smoothing=cfg.label_smoothing
    )

    # 3. stage 1: classifier on frozen embeddings (skipped when stage 2 resumes: its saved
    # state already holds the head).
    t0 = time.monotonic()
    resume_state = _load_resume(out, cfg) if cfg.resume else None
    if resume_state is None:
        train_feats = _embeddings(staged, train_acts[0], cut, cfg.eval_batch_size)
        val_feats = _embeddings(staged, val_acts, cut, cfg.eval_batch_size)
        stage1_auc, stage1_history = _train_head(
            staged, train_feats, train_labels, val_feats, val_labels, cfg, loss_fn
        )
        tqdm.write(f"stage 1: frozen backbone + trained head, val AUC {stage1_auc:.4f}")
    else:
        stage1_auc, stage1_history = resume_state["stage1_auc"], resume_state["stage1_history"]
        tqdm.write(f"resuming stage 2 after epoch {resume_state['epoch']} (stage 1 kept)")
    t_stage1 = time.monotonic() - t0

    # 4. stage 2: fine-tune the last blocks.
    t0 = time.monotonic()
    stage2 = _finetune(
        staged,
        train_acts,
        train_labels,
        val_acts,
        val_labels,
        cfg,
        cut,
        loss_fn,
        deadline,
        resume_state=resume_state,
        stage1=(stage1_auc, stage1_history),
    )
    t_stage2 = time.monotonic() - t0
    val_probs = _predict(staged, val_acts, cut, cfg.eval_batch_size)

    model = model.to(device="cpu", memory_format=torch.contiguous_format).eval()
    torch.save(
        {
            "model": cfg.model,
            "num_classes": len(classes),
            "labels": list(classes),
            "cut": cut,
            "state_dict": model.state_dict(),
        },
        out / CHECKPOINT_NAME,
    )
    np.savez(out / "val_predictions_cached.npz", y=val_labels, p=val_probs)
    (out / RESUME_NAME).unlink(missing_ok=True)  # the run is complete; nothing to resume
    wall = time.monotonic() - t_start
    summary = {
        "config": cfg.to_json(),
        "model": cfg.model,
        "cut": cut,
        "trainable_blocks": (
            f"blocks {cut}-{staged.num_blocks - 1} of {staged.num_blocks} + head conv + classifier"
        ),
        "data": {
            "root": str(Path(cfg.data_root).resolve()),
            "train": {
                "images": len(train_items),
                "patients": len({i.patient for i in train_items}),
                **label_counts(train_items, classes),
            },
            "val": {
                "images": len(val_items),
                "patients": len({i.patient for i in val_items}),
                **label_counts(val_items, classes),
            },
            "augmented_views_per_train_image": cfg.aug_views,
        },
        "stage1": {"val_auc": stage1_auc, "history": stage1_history},
        "stage2": stage2,
        "val_auc": roc_auc(val_labels, val_probs),
        "seconds": {
            "decode_preprocess": t_decode,
            "frozen_prefix": t_frozen,
            "stage1": t_stage1,
            "stage2": t_stage2,
            "total": wall,
        },
        "environment": {
            "torch": torch.__version__,
            "threads": cfg.threads,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tqdm.write(
        f"Training took {wall / 60:.1f} min ({wall:.0f} s: decode {t_decode:.0f} s, frozen "
        f"prefix {t_frozen:.0f} s, stage 1 {t_stage1:.0f} s, stage 2 {t_stage2:.0f} s); "
        f"best val AUC {summary['val_auc']:.4f} (epoch {stage2['best_epoch']})"
    )
    return summary


def load_checkpoint(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model (eval mode) from ``run_dir/checkpoint.pt``."""
    ckpt = torch.load(Path(run_dir) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    model = build_model(ckpt["model"], ckpt["num_classes"], None)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
