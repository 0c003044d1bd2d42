"""The torchvision adapter: label mapping, pinned transforms, loss/predict modes, reproducible
sampling and checkpoint round trips (the protocol itself is checked by test_conformance.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diode.detectors.base import Detector
from diode.detectors.checkpoint import load_detector, save_checkpoint
from diode.detectors.registry import build_detector, list_detectors
from diode.detectors.torchvision_adapter import FAMILIES, TorchvisionDetector

CLASS_NAMES = ["cat", "dog", "bird"]
SIZE = (64, 96)  # (H, W)
NAMES = ["tv-fasterrcnn-mobilenet", "tv-fasterrcnn-resnet50", "tv-retinanet", "tv-fcos", "tv-ssd",
         "tv-ssdlite"]
BACKGROUND = {"tv-fasterrcnn-mobilenet", "tv-fasterrcnn-resnet50", "tv-ssd", "tv-ssdlite"}
FAST = ["tv-fasterrcnn-mobilenet", "tv-ssdlite"]


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _images(batch: int = 2, seed: int = 0, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _targets() -> list[dict[str, torch.Tensor]]:
    return [_target([[8, 8, 40, 40], [30, 10, 90, 60]], [0, 2]), _target([[50, 20, 70, 44]], [1])]


def _build(name: str, size: tuple[int, int] = SIZE, class_names: list[str] = CLASS_NAMES) -> TorchvisionDetector:
    torch.manual_seed(0)
    detector = build_detector(name, class_names=class_names, image_size=size)
    assert isinstance(detector, TorchvisionDetector)
    return detector


def _bn_state(detector: Detector) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in detector.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def _torchvision_num_classes(detector: TorchvisionDetector) -> int:
    model = detector.model
    if detector.family.startswith("tv-fasterrcnn"):
        return model.roi_heads.box_predictor.cls_score.out_features
    head = model.head.classification_head
    return head.num_classes if hasattr(head, "num_classes") else head.num_columns


# ----- registry, class counts and label mapping -------------------------------------------------


def test_all_names_registered() -> None:
    registered = list_detectors()
    assert set(NAMES) == set(FAMILIES) and set(NAMES) <= set(registered)
    assert all(registered[name].startswith("torchvision") for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_class_count_and_label_offset(name: str) -> None:
    class_names = [f"c{i}" for i in range(5)]
    detector = _build(name, class_names=class_names)
    offset = 1 if name in BACKGROUND else 0
    assert detector.arch == name and detector.label_offset == offset
    assert _torchvision_num_classes(detector) == 5 + offset
    assert set(detector.loss_weights.values()) == {1.0}


@pytest.mark.parametrize("name", ["tv-fasterrcnn-mobilenet", "tv-fcos"])
def test_label_mapping_round_trip(name: str) -> None:
    detector = _build(name)
    ours = torch.arange(detector.num_classes)
    theirs = detector.to_torchvision_labels(ours)
    assert theirs.dtype == torch.int64
    assert torch.equal(detector.from_torchvision_labels(theirs), ours)
    low = detector.label_offset  # background models never see index 0 as an object
    assert theirs.min() == low and theirs.max() == detector.num_classes - 1 + low
    assert theirs.max() < _torchvision_num_classes(detector)


def test_targets_reach_torchvision_shifted_and_predictions_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    detector = _build("tv-fasterrcnn-mobilenet")
    seen: list = []
    original = detector.model.forward

    def spy(images, targets=None):
        seen.append(targets)
        return original(images, targets)

    monkeypatch.setattr(detector.model, "forward", spy)
    detector.loss(_images(), _targets())
    assert [t["labels"].tolist() for t in seen[0]] == [[1, 3], [2]]

    def fake(images, targets=None):  # torchvision output: background (0) and an out-of-range label
        return [{"boxes": torch.tensor([[1.0, 2, 30, 40], [-5, -5, 200, 100], [0, 0, 10, 10], [0, 0, 9, 9]]),
                 "labels": torch.tensor([1, 3, 0, 4]), "scores": torch.tensor([0.9, 0.8, 0.7, 0.6])}
                for _ in images]

    monkeypatch.setattr(detector.model, "forward", fake)
    predictions = detector.predict(_images())
    assert len(predictions) == 2
    for p in predictions:
        assert p["labels"].tolist() == [0, 2]
        assert p["scores"].tolist() == pytest.approx([0.9, 0.8])
        assert p["boxes"].tolist() == [[1, 2, 30, 40], [0, 0, 96, 64]]  # clamped to (H, W) = (64, 96)


# ----- input size and transform ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_transform_is_pinned(name: str) -> None:
    transform = _build(name, size=(64, 96)).model.transform
    if name == "tv-ssd":
        assert transform.fixed_size == (300, 300)
    elif name == "tv-ssdlite":
        assert transform.fixed_size == (96, 64)  # torchvision's fixed_size is (W, H)
    else:
        assert transform.min_size == (64,) and transform.max_size == 96 and transform.fixed_size is None


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("size", [(96, 64), (72, 100)])  # portrait; sides not multiples of 32
def test_other_sizes_are_not_rescaled(name: str, size: tuple[int, int]) -> None:
    detector = _build(name, size=size)
    shapes: list[tuple[int, ...]] = []
    detector.model.backbone.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    images = _images(size=size).requires_grad_(True)
    targets = [_target([[4, 6, 50, 60]], [2]), _target([[10, 30, 60, 70]], [0])]
    with detector.loss_mode():
        terms = detector.loss(images, targets)
        detector.weighted_loss(terms).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()
    predictions = detector.eval().predict(images.detach(), score_thresh=0.0)
    height, width = size
    padded = (-(-height // 32) * 32, -(-width // 32) * 32) if name == "tv-fasterrcnn-mobilenet" else size
    assert {s[-2:] for s in shapes} == {padded}  # no resize: at most zero padding to a multiple of 32
    for p in predictions:
        assert len(p["boxes"]) > 0
        assert (p["boxes"][:, 0::2] <= width).all() and (p["boxes"][:, 1::2] <= height).all()


def test_wrong_input_size_and_bad_targets_raise() -> None:
    detector = _build("tv-ssdlite")
    with pytest.raises(ValueError, match=r"image_size.*\[2, 3, 96, 64\]"):
        detector.loss(_images(size=(96, 64)), _targets())
    with pytest.raises(ValueError, match="2 images"):
        detector.loss(_images(), _targets()[:1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        detector.loss(_images(), [_target([[1, 1, 9, 9]], [3]), _target([], [])])
    with pytest.raises(ValueError, match="x2 > x1"):
        detector.loss(_images(), [_target([[9, 1, 9, 9]], [0]), _target([], [])])


# ----- loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, keys", [
    ("tv-fasterrcnn-mobilenet", {"cls", "box", "rpn_obj", "rpn_box"}), ("tv-ssdlite", {"cls", "box"})])
def test_loss_terms_finite_with_image_gradients(name: str, keys: set[str]) -> None:
    detector = _build(name)
    images = _images().requires_grad_(True)
    with detector.loss_mode():
        terms = detector.loss(images, _targets())
    assert set(terms) == keys == set(detector.loss_weights)
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in terms.values()), terms
    detector.weighted_loss(terms).backward()
    assert torch.isfinite(images.grad).all() and (images.grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("initial", ["train", "eval"])
def test_loss_trains_heads_keeps_bn_mode_and_restores(initial: str) -> None:
    detector = _build("tv-fasterrcnn-mobilenet").train(initial == "train")
    inside: list[tuple[bool, bool, set[bool]]] = []

    def record(model, _args):
        inside.append((model.training, model.roi_heads.training, {bn.training for _, bn in detector.bn_layers()}))

    detector.model.register_forward_pre_hook(record)
    modes = {name: m.training for name, m in detector.named_modules()}
    before = _bn_state(detector)
    images = _images().requires_grad_(True)
    if initial == "eval":  # an eval-mode detector gives losses with frozen BN, like loss_mode()
        detector.weighted_loss(detector.loss(images, _targets())).backward()
        assert inside == [(True, True, {False})]
        assert all(torch.equal(before[k], v) for k, v in _bn_state(detector).items())
    else:
        with detector.loss_mode():
            detector.weighted_loss(detector.loss(images, _targets())).backward()
        assert inside == [(True, True, {False})]
        assert all(torch.equal(before[k], v) for k, v in _bn_state(detector).items())
        detector.loss(images, _targets())  # plain train mode: BN trains and updates its statistics
        assert inside[-1] == (True, True, {True})
        assert any(not torch.equal(before[k], v) for k, v in _bn_state(detector).items())
    assert {name: m.training for name, m in detector.named_modules()} == modes


def test_empty_targets_finite_and_differentiable() -> None:
    detector = _build("tv-fasterrcnn-mobilenet")
    images = _images().requires_grad_(True)
    with detector.loss_mode():
        terms = detector.loss(images, [_target([], []), _target([], [])])
    assert set(terms) == set(detector.loss_weights)
    assert all(torch.isfinite(v) for v in terms.values())
    assert float(terms["box"].detach()) == 0.0 and float(terms["rpn_box"].detach()) == 0.0  # nothing to regress
    detector.weighted_loss(terms).backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_loss_is_reproducible_for_the_same_seed() -> None:
    detector = _build("tv-fasterrcnn-mobilenet")
    # At 64x96 there are fewer anchors and proposals than the samplers' default batches (256 and
    # 512), so every one is used; small batches make the random subsampling actually choose.
    detector.model.rpn.fg_bg_sampler.batch_size_per_image = 16
    detector.model.roi_heads.fg_bg_sampler.batch_size_per_image = 16
    images = _images()

    def loss() -> dict[str, float]:
        with detector.loss_mode():
            return {k: float(v.detach()) for k, v in detector.loss(images, _targets()).items()}

    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first = loss()
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    torch.manual_seed(999)
    assert loss() == first  # whatever the global RNG state
    detector.generator_seed = 1
    assert loss() != first  # another seed samples other proposals
    detector.generator_seed = 0
    assert loss() == first
    detector.generator_seed = None  # torchvision's behaviour: draws from the global RNG
    torch.manual_seed(5)
    a = loss()
    assert not torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(5)
    assert loss() == a
    torch.manual_seed(6)
    assert loss() != a


# ----- predict ---------------------------------------------------------------------------------


def test_predict_thresholds_cap_and_restore() -> None:
    detector = _build("tv-ssdlite").train()
    holder = detector.model
    saved = (holder.score_thresh, holder.nms_thresh, holder.detections_per_img)
    images = _images()
    assert all(len(p["boxes"]) == 0 for p in detector.predict(images, score_thresh=1.0))
    full = detector.predict(images, score_thresh=0.0, iou_thresh=0.99)
    assert [len(p["boxes"]) for p in full] == [100, 100]
    detector.max_detections = 5
    capped = detector.predict(images, score_thresh=0.0)
    for p in capped:
        assert len(p["boxes"]) == 5 and (p["scores"][:-1] >= p["scores"][1:]).all()
        assert p["labels"].dtype == torch.int64 and ((p["labels"] >= 0) & (p["labels"] < 3)).all()
    assert (holder.score_thresh, holder.nms_thresh, holder.detections_per_img) == saved
    assert detector.training and all(m.training for m in detector.modules())  # modes restored


# ----- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAST)
def test_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    original = _build(name, size=(64, 64))
    original.loss(_images(size=(64, 64)), _targets())  # train mode: BN statistics move off their init
    original.eval()
    path = tmp_path / "tv.pt"
    save_checkpoint(path, original, command="test")
    loaded, payload = load_detector(path)
    assert isinstance(loaded, TorchvisionDetector) and not loaded.training
    assert payload["arch"] == loaded.arch == name
    assert loaded.class_names == CLASS_NAMES and loaded.image_size == (64, 64)
    expected, got = original.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    images = _images(seed=4, size=(64, 64))
    for p, q in zip(original.predict(images, score_thresh=0.0), loaded.predict(images, score_thresh=0.0)):
        assert len(p["boxes"]) > 0
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(p[key], q[key]), key
