"""Crash safety: SIGKILL `train`, `synthesize` and `distill` at random moments, rerun the same
command, and get exactly the files of an uninterrupted run, with no temp file left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diode.cli import main
from diode.detectors.checkpoint import save_checkpoint
from diode.detectors.registry import build_detector

KILLS = 5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill")
    assert main(["data", "shapes", "--out", str(root / "data"), "--train", "24", "--val", "8",
                 "--image-size", "64", "64", "--seed", "5", "--quiet"]) == 0
    torch.manual_seed(0)
    teacher = build_detector("yolo-lite-n", class_names=["circle", "square", "triangle", "star", "cross", "ring",
                                                        "hexagon", "arrow"], image_size=(64, 64))
    save_checkpoint(root / "teacher.pt", teacher.eval(), command="test")
    (root / "recipe.yaml").write_text("batch_size: 2\nstages:\n  - {iterations: 20, lr: 0.1}\n"
                                      "fp: {enabled: true, start: 5, every: 5, score_thresh: 0.0}\n")
    return root


def _commands(root: Path, out: Path) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "diode"]
    return {
        "train": [*base, "train", "--data", str(root / "data" / "train"), "--val", str(root / "data" / "val"),
                  "--arch", "yolo-lite-n", "--out", str(out), "--epochs", "8", "--batch-size", "8", "--resume",
                  "--device", "cpu"],
        "synthesize": [*base, "synthesize", "--teacher", str(root / "teacher.pt"), "--out", str(out),
                       "--num-images", "16", "--recipe", str(root / "recipe.yaml"), "--quiet", "--device", "cpu"],
        "distill": [*base, "distill", "--teacher", str(root / "teacher.pt"), "--student", "yolo-lite-n",
                    "--data", str(root / "data" / "train"), "--out", str(out), "--epochs", "8", "--batch-size", "8",
                    "--method", "pseudo-label=1,output=1", "--pseudo-score-thresh", "0.0", "--resume",
                    "--device", "cpu"],
    }


def _result_files(out: Path, command: str) -> dict[str, bytes]:
    if command == "synthesize":
        files = sorted((out / "images").glob("*.png")) + [out / "annotations.json"]
        return {p.name: p.read_bytes() for p in files}
    ckpt = torch.load(out / "last.pt", weights_only=True)
    return {k: v.numpy().tobytes() for k, v in ckpt["state_dict"].items()} | {
        "epoch": str(ckpt["train_state"]["epoch"]).encode()}


@pytest.mark.parametrize("command", ["train", "synthesize", "distill"])
def test_sigkill_then_rerun_matches_uninterrupted(workspace, tmp_path, command):
    reference = tmp_path / "reference"
    t0 = time.time()
    done = subprocess.run(_commands(workspace, reference)[command], capture_output=True, text=True, env=ENV,
                          timeout=600)
    duration = time.time() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    t0 = time.time()  # rerunning a finished run costs only start-up (imports, loading): measure it
    assert subprocess.run(_commands(workspace, reference)[command], capture_output=True, env=ENV,
                          timeout=600).returncode == 0
    work = max(duration - (time.time() - t0), 1.0)

    out = tmp_path / "killed"
    cmd = _commands(workspace, out)[command]
    rng = random.Random(f"{command}-kills")
    kills = 0
    for _ in range(3 * KILLS):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        # The output lock appears once the process is past its imports: from then on, kill after
        # a random slice of the work, so each killed run advances the job only a little and the
        # kills land at different points of it (loading, computing, writing).
        deadline = time.time() + 120
        while not (out / ".diode.lock").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.25) * work)
        if proc.poll() is not None:
            break  # the work was finished by this run
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if kills == KILLS:
            break
    assert kills == KILLS, f"only {kills} kills landed before the run finished: make the command longer"
    final = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert _result_files(out, command) == _result_files(reference, command)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ".diode.lock"]
    assert not leftovers, leftovers
