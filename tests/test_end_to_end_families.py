"""`diode synthesize` then `diode distill` end to end with teachers from other families
(torchvision, ultralytics) into a built-in student, and a torchvision student from a built-in
teacher: tiny sizes, a few iterations, but every step of the real CLI."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from diode.cli import main
from diode.detectors.checkpoint import save_checkpoint
from diode.detectors.registry import build_detector

NAMES = ["cat", "dog"]
FAMILIES = ["tv-ssdlite", "tv-fasterrcnn-mobilenet", "yolo-lite-n"]
if importlib.util.find_spec("ultralytics") is not None:
    FAMILIES.append("ul-yolov8n")


@pytest.mark.parametrize("teacher_arch", FAMILIES)
def test_synthesize_then_distill(tmp_path, teacher_arch):
    torch.manual_seed(0)
    teacher = build_detector(teacher_arch, class_names=NAMES, image_size=(64, 64)).eval()
    save_checkpoint(tmp_path / "teacher.pt", teacher, command="test")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("batch_size: 2\nstages:\n  - {iterations: 2, lr: 0.1}\n"
                      "fp: {enabled: true, start: 0, every: 1, score_thresh: 0.0}\n")
    assert main(["synthesize", "--teacher", str(tmp_path / "teacher.pt"), "--out", str(tmp_path / "syn"),
                 "--num-images", "2", "--recipe", str(recipe), "--quiet", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "syn" / "summary.json").read_text())
    assert summary["num_images"] == 2
    student = "tv-ssdlite" if teacher_arch == "yolo-lite-n" else "yolo-lite-n"
    assert main(["distill", "--teacher", str(tmp_path / "teacher.pt"), "--student", student,
                 "--data", str(tmp_path / "syn"), "--val", str(tmp_path / "syn"), "--out", str(tmp_path / "kd"),
                 "--epochs", "1", "--batch-size", "2", "--pseudo-score-thresh", "0.0", "--device", "cpu"]) == 0
    ckpt = torch.load(tmp_path / "kd" / "best.pt", weights_only=True)
    assert ckpt["arch"] == student and ckpt["class_names"] == NAMES
