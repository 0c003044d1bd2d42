"""Supervised training: outputs on disk, exact resume after a crash, resume of a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diode.config import TrainConfig
from diode.detectors.base import Detector
from diode.detectors.checkpoint import load_detector, read_checkpoint, save_checkpoint
from diode.detectors.registry import build_detector
from diode.errors import DiodeError
from diode.training.trainer import EpochResult, TrainResult, train_detector

CLASS_NAMES = ["red", "green", "blue"]
SIZE = 64
CFG = TrainConfig(epochs=2, batch_size=16, eval_every=1)


def _squares(n: int, seed: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """uint8 [n, 3, 64, 64] grey-noise images, each with 1-2 solid squares coloured by class."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (n, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    targets = []
    for i in range(n):
        boxes, labels = [], []
        for _ in range(1 + i % 2):
            side = int(torch.randint(12, 28, (1,), generator=gen))
            x, y = (int(v) for v in torch.randint(0, SIZE - side, (2,), generator=gen))
            label = int(torch.randint(0, 3, (1,), generator=gen))
            images[i, :, y:y + side, x:x + side] = 0
            images[i, label, y:y + side, x:x + side] = 255
            boxes.append([x, y, x + side, y + side])
            labels.append(label)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
    return images, targets


TRAIN = _squares(32, seed=0)
VAL = _squares(8, seed=1)


def _model() -> Detector:
    torch.manual_seed(0)
    return build_detector("yolo-lite-n", class_names=CLASS_NAMES, image_size=(SIZE, SIZE))


def _train(out_dir: Path, **kwargs) -> TrainResult:
    return train_detector(_model(), *TRAIN, *VAL, CFG, out_dir, progress=False, **kwargs)


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[EpochResult], TrainResult]:
    """Two epochs, uninterrupted."""
    out = tmp_path_factory.mktemp("run_a")
    seen: list[EpochResult] = []
    result = _train(out, command="diode train test", on_epoch=seen.append)
    return out, seen, result


def test_writes_checkpoints_and_history(run_a) -> None:
    out, seen, result = run_a
    assert {"best.pt", "last.pt", "history.json"} <= {p.name for p in out.iterdir()}
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert {"map", "map_50"} <= set(h["metrics"])
        assert 0 <= h["metrics"]["map"] <= h["metrics"]["map_50"] <= 1
        assert set(h["loss"]) == {"box", "obj", "cls"}
        assert all(v > 0 for v in h["loss"].values())
    assert [r.epoch for r in seen] == [1, 2]
    assert [r.epoch for r in result.history] == [1, 2]
    assert result.best_map == max(h["metrics"]["map"] for h in history)

    last = read_checkpoint(out / "last.pt")
    assert last["train_state"]["epoch"] == 2
    assert last["command"] == "diode train test"
    assert last["metrics"] == history[-1]["metrics"]
    best, payload = load_detector(out / "best.pt")
    assert "train_state" not in payload
    assert payload["metrics"]["map"] == result.best_map
    assert best.class_names == CLASS_NAMES and best.image_size == (SIZE, SIZE)


def test_training_changes_the_weights(run_a) -> None:
    out, _, _ = run_a
    trained = read_checkpoint(out / "last.pt")["train_state"]["model"]
    initial = _model().state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if initial[k].is_floating_point())


def test_resume_after_crash_matches_uninterrupted_run(run_a, tmp_path: Path) -> None:
    out_a, _, _ = run_a

    def crash(result: EpochResult) -> None:
        raise _Crash(f"after epoch {result.epoch}")

    with pytest.raises(_Crash, match="after epoch 1"):
        _train(tmp_path, command="diode train test", on_epoch=crash)
    assert read_checkpoint(tmp_path / "last.pt")["train_state"]["epoch"] == 1
    assert len(json.loads((tmp_path / "history.json").read_text())) == 1

    seen: list[EpochResult] = []
    result = _train(tmp_path, command="diode train test", resume=True, on_epoch=seen.append)
    assert [r.epoch for r in seen] == [2]
    assert [r.epoch for r in result.history] == [1, 2]

    a, b = read_checkpoint(out_a / "last.pt"), read_checkpoint(tmp_path / "last.pt")
    # Both the saved EMA weights and the raw model weights match bit for bit.
    pairs = ((a["state_dict"], b["state_dict"]), (a["train_state"]["model"], b["train_state"]["model"]))
    for sd_a, sd_b in pairs:
        assert sd_a.keys() == sd_b.keys()
        for key in sd_a:
            assert torch.equal(sd_a[key], sd_b[key]), key
    history_a = json.loads((out_a / "history.json").read_text())
    history_b = json.loads((tmp_path / "history.json").read_text())
    assert history_a == history_b


def test_resume_of_finished_run_does_not_train(run_a) -> None:
    out, _, _ = run_a
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "history.json")}

    def fail(result: EpochResult) -> None:
        raise AssertionError(f"trained epoch {result.epoch} again")

    result = _train(out, resume=True, on_epoch=fail)
    assert [r.epoch for r in result.history] == [1, 2]
    assert result.best_map == read_checkpoint(out / "best.pt")["metrics"]["map"]
    assert {name: (out / name).read_bytes() for name in before} == before


def test_resume_without_train_state_raises(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "last.pt", _model())
    with pytest.raises(DiodeError, match="training state"):
        _train(tmp_path, resume=True)


def test_empty_training_set_raises(tmp_path: Path) -> None:
    with pytest.raises(DiodeError, match="empty"):
        train_detector(_model(), TRAIN[0][:0], [], *VAL, CFG, tmp_path, progress=False)


def test_checkpoint_every_writes_only_every_nth_epoch_and_resumes_from_the_last_written(tmp_path: Path) -> None:
    from dataclasses import replace

    cfg = replace(CFG, epochs=3, checkpoint_every=2, eval_every=3)
    written: list[int] = []

    def crash_after_3(result: EpochResult) -> None:
        written.append(read_checkpoint(tmp_path / "last.pt")["train_state"]["epoch"]
                       if (tmp_path / "last.pt").exists() else 0)
        if result.epoch == 3:
            raise _Crash("after epoch 3")

    # Epoch 1: nothing written yet; epoch 2: written; epoch 3 (the end) written before the callback.
    with pytest.raises(_Crash):
        train_detector(_model(), *TRAIN, *VAL, cfg, tmp_path, progress=False, on_epoch=crash_after_3)
    assert written == [0, 2, 3]
    full = read_checkpoint(tmp_path / "last.pt")
    # Resuming from epoch 2's checkpoint replays epoch 3 to the same weights.
    (tmp_path / "last.pt").unlink()
    partial = tmp_path / "partial"
    with pytest.raises(_Crash):
        train_detector(_model(), *TRAIN, *VAL, replace(cfg, epochs=3), partial, progress=False,
                       on_epoch=lambda r: (_ for _ in ()).throw(_Crash()) if r.epoch == 2 else None)
    assert read_checkpoint(partial / "last.pt")["train_state"]["epoch"] == 2
    train_detector(_model(), *TRAIN, *VAL, cfg, partial, progress=False, resume=True)
    resumed = read_checkpoint(partial / "last.pt")
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
