"""`torchrun --nproc_per_node=2 -m diode synthesize` (gloo on CPU) gives the single-process dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from diode.detectors.checkpoint import save_checkpoint
from diode.detectors.registry import build_detector


def _images(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


def test_torchrun_two_ranks_match_single_process(tmp_path):
    torch.manual_seed(0)
    teacher = build_detector("yolo-lite-n", class_names=["a", "b"], image_size=(64, 64))
    save_checkpoint(tmp_path / "t.pt", teacher.eval(), command="test")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_size: 2\nstages:\n  - {iterations: 3, lr: 0.1}\n")
    common = ["synthesize", "--teacher", str(tmp_path / "t.pt"), "--num-images", "6", "--recipe", str(recipe),
              "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "diode", *common, "--out", str(tmp_path / "single")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diode"]
    multi = subprocess.run([*torchrun, *common, "--out", str(tmp_path / "multi")],
                           capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert len(_images(tmp_path / "single")) == 6
    assert _images(tmp_path / "multi") == _images(tmp_path / "single")
    assert (tmp_path / "multi" / "annotations.json").read_text() == (tmp_path / "single" / "annotations.json").read_text()


def test_torchrun_distill_two_ranks(tmp_path):
    """Data-parallel distillation: both ranks step together and rank 0 writes the checkpoints."""
    torch.manual_seed(0)
    teacher = build_detector("yolo-lite-n", class_names=["a", "b"], image_size=(64, 64))
    save_checkpoint(tmp_path / "t.pt", teacher.eval(), command="test")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diode"]
    proc = subprocess.run([*torchrun, "distill", "--teacher", str(tmp_path / "t.pt"), "--student", "yolo-lite-n",
                           "--data", "noise:uniform", "--num-images", "8", "--out", str(tmp_path / "kd"),
                           "--epochs", "2", "--batch-size", "4", "--method", "output", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "kd" / "last.pt", weights_only=True)
    assert ckpt["train_state"]["epoch"] == 2
    assert proc.stdout.count("done:") == 1  # only rank 0 reports
