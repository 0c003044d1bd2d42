"""tv-fcos-mobilenetv2: FCOS on an ImageNet-loadable MobileNetV2 (the realistic-teacher recipe).

The ImageNet weights are never needed: a random state dict with torchvision's mobilenet_v2 keys
stands in for them. The protocol itself is checked by test_conformance.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

from diode.cli import main
from diode.detectors.backbones import MobileNetV2FPN, imagenet_backbone, load_backbone_weights
from diode.detectors.checkpoint import load_detector, save_checkpoint
from diode.detectors.registry import build_detector, list_detectors
from diode.errors import DiodeError

NAME = "tv-fcos-mobilenetv2"
CLASS_NAMES = ["cat", "dog", "bird"]
MOBILENET_BN = 51  # features.0: 1, features.1 (no expansion): 2, features.2-17: 16 blocks x 3
FPN_BN = 6  # a 1x1 lateral and a 3x3 output conv per level, 3 levels


def _build(size: tuple[int, int] = (128, 128)):
    torch.manual_seed(0)
    return build_detector(NAME, class_names=CLASS_NAMES, image_size=size)


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _images(size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0))


def _fake_imagenet(seed: int = 1) -> dict[str, torch.Tensor]:
    """torchvision's mobilenet_v2 keys and shapes with random values (positive variances)."""
    gen = torch.Generator().manual_seed(seed)
    return {key: (torch.rand(value.shape, generator=gen) + 0.5 if value.is_floating_point() else value + 7)
            for key, value in mobilenet_v2(weights=None).state_dict().items()}


@pytest.fixture
def fake_weights(tmp_path: Path) -> Path:
    path = tmp_path / "mobilenet_v2-fake.pth"
    torch.save(_fake_imagenet(), path)
    return path


def test_registered_with_a_description() -> None:
    assert list_detectors()[NAME].startswith("torchvision FCOS, MobileNetV2")


@pytest.mark.parametrize("size", [(64, 64), (128, 128)])
def test_losses_gradients_and_predictions(size: tuple[int, int]) -> None:
    detector = _build(size)
    scale = size[0] / 128  # the same scene at both sizes: small, medium and large boxes
    targets = [_target([[v * scale for v in box] for box in ([8, 8, 60, 50], [70, 64, 120, 124])], [0, 2]),
               _target([[v * scale for v in (30, 20, 50, 44)]], [1])]
    images = _images(size).requires_grad_(True)
    with detector.loss_mode():
        terms = detector.loss(images, targets)
        detector.weighted_loss(terms).backward()
    assert set(terms) == {"cls", "box", "ctr"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values()), terms
    assert torch.isfinite(images.grad).all() and (images.grad.flatten(1).abs().sum(1) > 0).all()

    detector.eval()
    for p in detector.predict(_images(size, batch=3), score_thresh=0.0):
        n = len(p["boxes"])
        assert p["boxes"].shape == (n, 4) and p["labels"].dtype == torch.int64 and p["scores"].shape == (n,)
        assert 0 < n <= detector.max_detections
        assert (p["boxes"][:, 0::2] <= size[1]).all() and (p["boxes"][:, 1::2] <= size[0]).all()
        assert (p["boxes"] >= 0).all() and (p["boxes"][:, 2:] >= p["boxes"][:, :2]).all()
        assert ((p["labels"] >= 0) & (p["labels"] < len(CLASS_NAMES))).all()


def test_levels_and_score_threshold() -> None:
    detector = _build()
    levels = detector.model.backbone(torch.rand(1, 3, 128, 128))
    assert [tuple(v.shape) for v in levels.values()] == [(1, 64, 16, 16), (1, 64, 8, 8), (1, 64, 4, 4)]
    assert detector.label_offset == 0 and detector.score_thresh == pytest.approx(0.05)


def test_smallest_objects_get_positives() -> None:
    """An 8-px box (6 % of 128 px) is matched at stride 8: its box loss is not zero."""
    detector = _build()
    with detector.loss_mode():
        terms = detector.loss(_images((128, 128), batch=1), [_target([[17, 17, 25, 25]], [1])])
    assert terms["box"] > 0


def test_bn_layers_are_plain_batchnorm_and_counted() -> None:
    detector = _build()
    found = detector.bn_layers()
    assert len(found) == MOBILENET_BN + FPN_BN
    assert all(type(m) is nn.BatchNorm2d for _, m in found)
    backbone = [name for name, _ in found if name.startswith("model.backbone.features.")]
    assert len(backbone) == MOBILENET_BN


def test_training_keeps_the_backbone_statistics() -> None:
    """Train mode updates the FPN's BN statistics, never MobileNetV2's; its BN affine weights learn."""
    detector = _build().train()
    backbone = imagenet_backbone(detector)
    assert isinstance(backbone, MobileNetV2FPN)
    frozen = [m for m in backbone.features.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen and not any(m.training for m in frozen) and backbone.fpn.training
    before = {k: v.clone() for k, v in detector.model.state_dict().items() if "running_" in k}
    terms = detector.loss(_images((128, 128)), [_target([[8, 8, 60, 50]], [0]), _target([[30, 20, 90, 84]], [1])])
    detector.weighted_loss(terms).backward()
    after = detector.model.state_dict()
    for key, value in before.items():
        moved = not torch.equal(value, after[key])
        assert moved == key.startswith("backbone.fpn."), key
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in frozen)
    # eval() and loss_mode() still reach every BN layer, and train() after them re-freezes.
    detector.eval()
    assert not any(m.training for _, m in detector.bn_layers())
    detector.train()
    assert not any(m.training for m in frozen)


def test_load_backbone_weights(fake_weights: Path) -> None:
    detector = _build()
    head_before = {k: v.clone() for k, v in detector.model.head.state_dict().items()}
    load_backbone_weights(detector, fake_weights)
    source = _fake_imagenet()
    loaded = detector.model.backbone.features.state_dict()
    assert len(loaded) == len([k for k in source if k.startswith("features.") and int(k.split(".")[1]) < 18])
    for key, value in loaded.items():
        assert torch.equal(value, source[f"features.{key}"]), key
    assert all(torch.equal(v, detector.model.head.state_dict()[k]) for k, v in head_before.items())


def test_loaded_detector_round_trips_through_a_checkpoint(fake_weights: Path, tmp_path: Path) -> None:
    detector = _build()
    load_backbone_weights(detector, fake_weights)
    save_checkpoint(tmp_path / "t.pt", detector)
    restored, _ = load_detector(tmp_path / "t.pt")
    images = _images((128, 128))
    detector.eval()
    for a, b in zip(detector.predict(images, score_thresh=0.0), restored.predict(images, score_thresh=0.0)):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


class _Payload:
    """Something only full unpickling can rebuild."""


@pytest.mark.parametrize("make, needle", [
    (lambda p: None, "not found"),
    (lambda p: torch.save({k: v for k, v in _fake_imagenet().items() if not k.startswith("features.3.")}, p),
     "features.3."),
    (lambda p: torch.save({**_fake_imagenet(), "features.0.0.weight": torch.zeros(16, 3, 3, 3)}, p),
     "features.0.0.weight"),
    (lambda p: torch.save({"features.0.0.weight": torch.zeros(32, 3, 3, 3)}, p), "mobilenet_v2"),
    (lambda p: torch.save([torch.zeros(1)], p), "not a state dict"),
    (lambda p: torch.save({"x": _Payload()}, p), "weights-only"),
    (lambda p: p.write_bytes(b"not a pickle"), "weights-only"),
])
def test_bad_weight_files_raise_one_line(tmp_path: Path, make, needle: str) -> None:
    path = tmp_path / "w.pth"
    make(path)
    detector = _build()
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    with pytest.raises(DiodeError) as excinfo:
        load_backbone_weights(detector, path)
    message = str(excinfo.value)
    assert needle in message and str(path) in message and len(message.splitlines()) == 1
    assert all(torch.equal(v, detector.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_other_architectures_refuse_backbone_weights(fake_weights: Path) -> None:
    other = build_detector("yolo-lite-n", class_names=CLASS_NAMES, image_size=(64, 64))
    assert imagenet_backbone(other) is None
    with pytest.raises(DiodeError, match="yolo-lite-n has no MobileNetV2 backbone"):
        load_backbone_weights(other, fake_weights)


# ----- CLI ---------------------------------------------------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_cli_train_with_backbone_weights(tmp_path: Path, fake_weights: Path, capsys) -> None:
    data = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(data), "--train", "8", "--val", "4", "--image-size", "64", "64",
                 "--seed", "3", "--quiet"]) == 0
    common = ["train", "--data", str(data / "train"), "--val", str(data / "val"), "--epochs", "1",
              "--batch-size", "4", "--device", "cpu"]
    run = tmp_path / "run"
    assert main([*common, "--arch", NAME, "--out", str(run), "--backbone-weights", str(fake_weights)]) == 0
    assert "note:" not in capsys.readouterr().err
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["arch"] == NAME and ckpt["image_size"] == [64, 64]
    assert "--backbone-weights" in ckpt["command"]
    source = _fake_imagenet()
    for key in ("features.5.conv.1.1.running_mean", "features.17.conv.3.running_var"):
        # Frozen through training (the checkpoint holds the EMA of unchanged buffers).
        assert torch.allclose(ckpt["state_dict"][f"model.backbone.{key}"], source[key]), key

    assert main([*common, "--arch", NAME, "--out", str(tmp_path / "random")]) == 0  # allowed, with a note
    assert "pass --backbone-weights" in capsys.readouterr().err

    assert main([*common, "--arch", NAME, "--out", str(tmp_path / "r2"),
                 "--backbone-weights", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth: backbone weights file not found" in _error_line(capsys)
    assert main([*common, "--arch", "yolo-lite-n", "--out", str(tmp_path / "r3"),
                 "--backbone-weights", str(fake_weights)]) == 2
    assert "no MobileNetV2 backbone" in _error_line(capsys)
    assert main([*common, "--arch", NAME, "--out", str(tmp_path / "r4"), "--backbone-weights", str(fake_weights),
                 "--init", str(run / "best.pt")]) == 2
    assert "--init" in _error_line(capsys)
