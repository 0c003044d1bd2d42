"""Pseudo-label distillation across detector families (ultralytics <-> yolo-lite): one tiny epoch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics")

from diode.config import TrainConfig  # noqa: E402
from diode.detectors.checkpoint import load_detector  # noqa: E402
from diode.detectors.registry import build_detector  # noqa: E402
from diode.distill.losses import DistillConfig, DistillObjective, check_compatible  # noqa: E402
from diode.training.trainer import train_detector  # noqa: E402

CLASS_NAMES = ["cat", "dog", "bird"]
SIZE = (64, 64)


@pytest.mark.parametrize("teacher_arch, student_arch", [("ul-yolov8n", "yolo-lite-n"),
                                                        ("yolo-lite-n", "ul-yolov8n")])
def test_pseudo_label_distillation_across_families(tmp_path: Path, teacher_arch: str, student_arch: str) -> None:
    torch.manual_seed(0)
    teacher = build_detector(teacher_arch, class_names=CLASS_NAMES, image_size=SIZE).eval()
    student = build_detector(student_arch, class_names=CLASS_NAMES, image_size=SIZE)
    kd = DistillConfig(methods={"pseudo-label": 1.0}, pseudo_score_thresh=0.0)
    check_compatible(teacher, student, kd, SIZE)
    images = torch.randint(0, 256, (4, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    no_labels = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}] * len(images)
    cfg = TrainConfig(epochs=1, batch_size=2, seed=0)
    result = train_detector(student, images, no_labels, torch.empty((0, 3, *SIZE), dtype=torch.uint8), [], cfg,
                            tmp_path, progress=False, objective=DistillObjective(teacher, kd))
    losses = result.history[0].loss
    assert "pseudo-label" in losses and {f"pl_{k}" for k in student.loss_weights} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert losses["pseudo-label"] > 0
    for name in ("best.pt", "last.pt"):
        assert (tmp_path / name).is_file(), name
    reloaded, payload = load_detector(tmp_path / "best.pt")
    assert payload["arch"] == student_arch and reloaded.class_names == CLASS_NAMES
