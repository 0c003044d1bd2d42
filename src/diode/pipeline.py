"""Library-level steps shared by the demo and the experiment: synthesise, distil, train, score.

Each step is resumable through the run folders it writes (finished synthesis batches and
training epochs are kept), so a long job cut off by a crash continues when called again.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diode.config import SynthesisConfig, TrainConfig
from diode.detectors.base import Detector
from diode.detectors.checkpoint import load_detector
from diode.detectors.registry import build_detector
from diode.distill.losses import DistillConfig, DistillObjective, resolve_methods
from diode.evaluation import evaluate_detector
from diode.synthesis.runner import RunSpec, SynthesisRun
from diode.synthesis.synthesizer import use_channels_last
from diode.training.trainer import supervised_objective, train_detector
from diode.types import Target, empty_target


def synthesize_dataset(teacher: Detector, teacher_name: str, cfg: SynthesisConfig, out_dir: Path, num_images: int,
                       seed: int, *, command: str = "", progress: bool = True,
                       verifier: Detector | None = None) -> dict:
    """Run (or finish) a synthesis into `out_dir`; returns its summary (see runner.merge). The
    teacher runs in channels_last where that is the default (`use_channels_last`: the CPU) and is
    given back in the format it came in."""
    run = SynthesisRun(teacher, RunSpec(num_images, teacher.image_size, seed, teacher_name, cfg), out_dir,
                       command=command, verifier=verifier)
    run.check_or_write_settings()
    weights = [p for p in teacher.parameters() if p.dim() == 4]
    convert = use_channels_last(next(teacher.parameters()).device) and bool(weights) and \
        weights[0].is_contiguous() and not weights[0].is_contiguous(memory_format=torch.channels_last)
    if convert:
        teacher.to(memory_format=torch.channels_last)
    try:
        run.run(progress=progress)
    finally:
        if convert:
            teacher.to(memory_format=torch.contiguous_format)
    return run.merge()


def train_student(teacher: Detector, student_arch: str, images: torch.Tensor, targets: list[Target] | None,
                  val_images: torch.Tensor, val_targets: list[Target], cfg: TrainConfig, out_dir: Path, *,
                  kd: DistillConfig | None = None, progress: bool = True, command: str = "") -> dict:
    """Train a fresh student for `teacher`'s classes: KD from the teacher when `targets` is None
    (`kd`, by default the `auto` method), else supervised on `targets` (the real-label reference). Returns the real-val metrics of its
    best checkpoint."""
    device = next(teacher.parameters()).device
    class_names = teacher.class_names
    image_size = tuple(images.shape[-2:])
    torch.manual_seed(cfg.seed)
    student = build_detector(student_arch, class_names=class_names, image_size=image_size).to(device)
    if targets is None:
        kd = kd or DistillConfig(methods=resolve_methods("auto", teacher, student, image_size))
        objective = DistillObjective(teacher, kd)
        targets = [empty_target()] * len(images)
    else:
        objective = supervised_objective
    train_detector(student, images, targets, val_images, val_targets, cfg, out_dir, command=command,
                   resume=True, progress=progress, objective=objective)
    best, _ = load_detector(out_dir / "best.pt", device=device)
    return evaluate_detector(best, val_images, val_targets, best.class_names)
