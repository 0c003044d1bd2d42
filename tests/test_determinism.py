"""Same command, same seed, same machine: identical files (docs/determinism.md).

Two runs of one command into two folders give byte-identical images and labels (synthesize) and
identical weights (train); another seed gives other images. Interrupted, resumed and torchrun-split
runs are checked against uninterrupted ones in test_kill_resume.py and tests/synthesis/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diode.cli import main
from diode.data.shapes import CLASS_NAMES
from diode.detectors.checkpoint import save_checkpoint
from diode.detectors.registry import build_detector

# Two stages at two resolutions, false-positive aggregation and both loss-logging paths: most
# of what consumes random numbers.
RECIPE = """batch_size: 2
stages:
  - {iterations: 2, scale: 0.5, pixel_scale: 0.5, lr: 0.1}
  - {iterations: 2, lr: 0.05, betas: [0.9, 0.999]}
targets: {sampler: multi-box}
fp: {enabled: true, start: 1, every: 1, score_thresh: 0.0}
log_every: 1
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("determinism")
    torch.manual_seed(0)
    teacher = build_detector("yolo-lite-n", class_names=CLASS_NAMES, image_size=(64, 64)).eval()
    save_checkpoint(root / "teacher.pt", teacher, command="test")
    (root / "recipe.yaml").write_text(RECIPE)
    assert main(["data", "shapes", "--out", str(root / "data"), "--train", "8", "--val", "4",
                 "--image-size", "64", "64", "--seed", "2", "--quiet"]) == 0
    return root


def _dataset_files(out: Path) -> dict[str, bytes]:
    """Images, YOLO labels and the COCO index (the manifest and summary hold timings)."""
    files = [*sorted((out / "images").glob("*.png")), *sorted((out / "labels").glob("*.txt")),
             out / "annotations.json", out / "data.yaml"]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def _synthesize(workspace: Path, out: Path, seed: int) -> dict[str, bytes]:
    assert main(["synthesize", "--teacher", str(workspace / "teacher.pt"), "--out", str(out), "--num-images", "3",
                 "--recipe", str(workspace / "recipe.yaml"), "--seed", str(seed), "--quiet", "--device", "cpu"]) == 0
    return _dataset_files(out)


def test_synthesize_twice_gives_identical_files(workspace: Path, tmp_path: Path) -> None:
    first = _synthesize(workspace, tmp_path / "a", seed=5)
    assert len([n for n in first if n.endswith(".png")]) == 3
    assert _synthesize(workspace, tmp_path / "b", seed=5) == first
    other = _synthesize(workspace, tmp_path / "c", seed=6)
    assert [other[n] for n in first if n.endswith(".png")] != [first[n] for n in first if n.endswith(".png")]


def test_train_twice_gives_identical_weights(workspace: Path, tmp_path: Path) -> None:
    def train(out: Path) -> dict[str, torch.Tensor]:
        assert main(["train", "--data", str(workspace / "data" / "train"), "--val", str(workspace / "data" / "val"),
                     "--arch", "yolo-lite-n", "--out", str(out), "--epochs", "2", "--batch-size", "4",
                     "--device", "cpu"]) == 0
        ckpt = torch.load(out / "last.pt", weights_only=True)
        return {**ckpt["state_dict"], **{f"train.{k}": v for k, v in ckpt["train_state"]["model"].items()}}

    first, second = train(tmp_path / "a"), train(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "a" / "history.json").read_text() == (tmp_path / "b" / "history.json").read_text()


def test_deterministic_flag_runs_in_deterministic_mode_and_restores_it(workspace: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`diode --deterministic ...` runs the command under torch.use_deterministic_algorithms(True)
    (every operation synthesis uses has a deterministic kernel: none raises), gives the same files
    as without the flag on the CPU, and leaves the mode as it found it."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    from diode.synthesis.synthesizer import Synthesizer

    original = Synthesizer.synthesize

    def spy(self, *args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Synthesizer, "synthesize", spy)
    plain = _synthesize(workspace, tmp_path / "plain", seed=5)
    assert main(["--deterministic", "synthesize", "--teacher", str(workspace / "teacher.pt"), "--out",
                 str(tmp_path / "det"), "--num-images", "3", "--recipe", str(workspace / "recipe.yaml"), "--seed", "5",
                 "--quiet", "--device", "cpu"]) == 0
    assert _dataset_files(tmp_path / "det") == plain
    assert not torch.are_deterministic_algorithms_enabled()
    assert __import__("os").environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    assert seen == [False] * 2 + [True] * 2  # batch size 2: two batches per run
