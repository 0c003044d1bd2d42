"""What the loop benchmarks share: the teacher's bare forward + backward, timed the same way by every
benchmark that divides by it (`synthesis_overhead.py`, `teacher_pass.py`, `loop_ab.py`: the task
loss on one-box targets in `loss_mode()`, backward to the images, nothing else), and the one-stage
synthesis config the loop is timed with."""

from __future__ import annotations

import time
from typing import Callable

import torch

from diode.config import SynthesisConfig
from diode.detectors.base import Detector
from diode.synthesis.recipes import build_config, load_recipe
from diode.types import Target


def bare_pass_seconds(teacher: Detector, images: torch.Tensor, targets: list[Target], iterations: int,
                      precision: str = "fp32", sync: Callable[[], None] = lambda: None) -> float:
    """Mean wall seconds of one bare pass over `iterations` passes on a copy of `images` that
    requires grad (`sync` waits for the device before and after the timed passes)."""
    x = images.detach().clone().requires_grad_(True)
    sync()
    t0 = time.perf_counter()
    for _ in range(iterations):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), teacher.loss_mode():
            loss = teacher.weighted_loss(teacher.loss(x, targets))
        loss.backward()
        x.grad = None
    sync()
    return (time.perf_counter() - t0) / iterations


def one_stage_config(recipe: str, iterations: int, batch_size: int, precision: str = "fp32") -> SynthesisConfig:
    """The recipe's last stage alone, at full resolution, for `iterations`, without false-positive
    aggregation or tiling: the per-iteration work of a synthesis."""
    raw = load_recipe(recipe)
    raw.update(stages=[dict(raw["stages"][-1], iterations=iterations, scale=1.0, pixel_scale=1.0)],
               fp={"enabled": False}, tiling={"enabled": False})
    return build_config(raw, batch_size=batch_size, precision=precision)
