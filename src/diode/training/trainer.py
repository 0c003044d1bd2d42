"""Supervised detector training: AdamW, warm-up + cosine, EMA, batch augmentation, resume.

The whole training set is held in memory as uint8 (small datasets, CPU-friendly: no loader
workers competing for the two cores). Shuffling and augmentation of epoch `e` are seeded from
(seed, e), so a run resumed from `last.pt` continues exactly as an uninterrupted one would.
Checkpoints are written atomically at the end of every epoch: `last.pt` (EMA weights plus the
training state) and `best.pt` (EMA weights with the best val mAP@[.5:.95] so far). Under torchrun
(an initialised process group) the global batch is split across ranks and gradients averaged;
rank 0 evaluates and writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from diode.config import TrainConfig
from diode.detectors.base import Detector
from diode.detectors.checkpoint import read_checkpoint, save_checkpoint
from diode.errors import DiodeError
from diode.evaluation import evaluate_detector
from diode.io import atomic_write_json
from diode.training.augment import augment_batch
from diode.training.ema import ModelEMA
from diode.types import Target


@dataclass
class EpochResult:
    epoch: int  # 1-based
    loss: dict[str, float]  # mean of each named loss term over the epoch
    metrics: dict  # val metrics (empty when not evaluated this epoch)
    lr: float


@dataclass
class TrainResult:
    history: list[EpochResult] = field(default_factory=list)
    best_map: float = -1.0


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay only conv/linear weights: decaying BN scales and biases only hurts.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


SYNC_EVERY = 25  # steps between host syncs (finiteness check, progress-bar losses)
GPU_RESIDENT_BYTES = 4 << 30  # uint8 training sets up to this size are moved to the GPU once

Objective = Callable[[Detector, torch.Tensor, list[Target]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def supervised_objective(model: Detector, images: torch.Tensor, targets: list[Target]):
    """The detector's own loss on labelled images: (weighted total, named terms)."""
    terms = model.loss(images, targets)
    return model.weighted_loss(terms), terms


def train_detector(model: Detector, train_images: torch.Tensor, train_targets: list[Target],
                   val_images: torch.Tensor, val_targets: list[Target], cfg: TrainConfig,
                   out_dir: Path, *, command: str = "", resume: bool = False, progress: bool = True,
                   on_epoch: Callable[[EpochResult], None] | None = None,
                   objective: Objective = supervised_objective) -> TrainResult:
    """Train `model` in place; write `out_dir/{last,best}.pt` and `history.json`.

    train_images: uint8 [N, 3, H, W] at the model's image size; targets in that pixel frame (empty
    for knowledge distillation, whose `objective` gets its supervision from a teacher).
    val_images may be empty: then nothing is evaluated and `best.pt` follows `last.pt`.
    """
    device = next(model.parameters()).device
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(train_images)
    if n == 0:
        raise DiodeError("training set is empty")
    steps_per_epoch = max(1, n // cfg.batch_size)  # drop the last partial batch: stable BN stats
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps // 2) or 1

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    ema = ModelEMA(model, cfg.ema_decay)
    result = TrainResult()
    start_epoch = 0
    last_path = out_dir / "last.pt"
    if resume and last_path.exists():
        state = read_checkpoint(last_path).get("train_state")
        if state is None:
            raise DiodeError(f"{last_path}: has no training state to resume from")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start_epoch = int(state["epoch"])
        result.best_map = float(state["best_map"])
        result.history = [EpochResult(**h) for h in state["history"]]
        if start_epoch >= cfg.epochs:
            return result

    if device.type == "cuda" and train_images.numel() <= GPU_RESIDENT_BYTES:
        train_images = train_images.to(device)  # uint8 on the GPU once: no per-step host copies
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if world > 1:
        _broadcast_state(model)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        # Under torchrun each rank takes every world-th image of the global batch and augments it
        # with its own generator; gradients are averaged, so the step is the global batch's.
        aug_gen = gen if world == 1 else torch.Generator().manual_seed((cfg.seed * 100_003 + epoch) * 1009 + rank)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank > 0,
                   unit="batch", leave=False)
        for step_in_epoch in bar:
            step = epoch * steps_per_epoch + step_in_epoch
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, total_steps, warmup, cfg.min_lr_ratio)
            idx = order[step_in_epoch * cfg.batch_size:(step_in_epoch + 1) * cfg.batch_size][rank::world]
            images = train_images[idx].to(device).float() / 255
            images, targets = augment_batch(images, [train_targets[i] for i in idx.tolist()], cfg.augment, aug_gen)
            total, terms = objective(model, images, targets)
            if (step_in_epoch + 1) % SYNC_EVERY == 0 or step_in_epoch + 1 == steps_per_epoch:
                # One host sync every few steps (not every step): a NaN/Inf loss is caught within
                # SYNC_EVERY steps, before the epoch's checkpoint could be written.
                if not torch.isfinite(total):
                    raise DiodeError(f"training diverged at epoch {epoch + 1} step {step_in_epoch}: "
                                     f"loss is {total.item()} ({ {k: v.item() for k, v in terms.items()} })")
                bar.set_postfix({k: f"{float(v) / (step_in_epoch + 1):.3f}" for k, v in sums.items()})
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if world > 1:
                _average_gradients(model, world)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema.update(model)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()  # stays on the device
        bar.close()
        if not all(torch.isfinite(torch.as_tensor(v)) for v in sums.values()):
            raise DiodeError(f"training diverged in epoch {epoch + 1}: a loss term is not finite "
                             f"({ {k: float(v) for k, v in sums.items()} })")
        sums = {k: float(v) for k, v in sums.items()}
        if world > 1:
            _broadcast_state(model)  # rank 0's BN statistics for everyone (as DDP does)
            _broadcast_state(ema.model)
        if rank > 0:
            dist.barrier()  # rank 0 evaluates and writes; the others wait for it
            continue

        metrics: dict = {}
        if len(val_images) and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            metrics = evaluate_detector(ema.model, val_images, val_targets, model.class_names,
                                        batch_size=64, progress=False)
        epoch_result = EpochResult(epoch + 1, {k: v / steps_per_epoch for k, v in sums.items()},
                                   metrics, optimizer.param_groups[0]["lr"])
        result.history.append(epoch_result)
        # Checkpoints every `checkpoint_every` epochs, at evaluations and at the end: a resumed
        # run restarts from the last one written (same seeds per epoch, so the same result).
        if metrics or (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            _save(model, ema, optimizer, result, epoch + 1, metrics, bool(len(val_images)), out_dir, command)
        if on_epoch is not None:
            on_epoch(epoch_result)
        if world > 1:
            dist.barrier()
    return result


def _save(model: Detector, ema: ModelEMA, optimizer: torch.optim.Optimizer, result: TrainResult, epochs_done: int,
          metrics: dict, has_val: bool, out_dir: Path, command: str) -> None:
    """Write best.pt (when the val mAP improved, or always without a val set), last.pt with the
    training state, and history.json."""
    ema_state = ema.model.state_dict()
    if (metrics and metrics["map"] > result.best_map) or not has_val:
        result.best_map = metrics["map"] if metrics else result.best_map
        save_checkpoint(out_dir / "best.pt", model, command=command, metrics=metrics, state_dict=ema_state)
    train_state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                   "epoch": epochs_done, "best_map": result.best_map, "history": [vars(h) for h in result.history]}
    last_metrics = metrics or next((h.metrics for h in reversed(result.history) if h.metrics), {})
    save_checkpoint(out_dir / "last.pt", model, command=command, metrics=last_metrics, state_dict=ema_state,
                    train_state=train_state)
    atomic_write_json(out_dir / "history.json", [vars(h) for h in result.history])


def _broadcast_state(model: torch.nn.Module) -> None:
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    """All-reduce (mean) of every parameter's gradient; missing gradients count as zero."""
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)
