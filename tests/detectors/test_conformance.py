"""Every registered detector satisfies the detector protocol (STYLE.md), plus registry checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from diode.detectors.base import Detector
from diode.detectors.registry import build_detector, list_detectors, register
from diode.detectors.yolo_lite import YoloLite
from diode.errors import DiodeError

CLASS_NAMES = ["cat", "dog", "bird"]
IMAGE_SIZE = (64, 96)  # (H, W): non-square on purpose
NAMES = sorted(list_detectors())
BN_FREE = {"tv-ssd"}  # torchvision's SSD300 backbone is VGG-16 without batch norm
BN_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _size_error(name: str) -> str:
    """What a wrong input size error says: yolo-lite needs multiples of 32, adapters their image_size."""
    return "32" if name.startswith("yolo-lite") else "image_size"


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _images(batch: int = 2, seed: int = 0, size: tuple[int, int] = IMAGE_SIZE) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _targets() -> list[dict[str, torch.Tensor]]:
    # Small, medium and wide boxes, so several levels get positives.
    return [_target([[8, 8, 40, 40], [30, 10, 90, 60]], [0, 2]),
            _target([[50, 20, 70, 44]], [1])]


def _build(name: str, class_names: list[str] = CLASS_NAMES) -> Detector:
    torch.manual_seed(0)
    return build_detector(name, class_names=class_names, image_size=IMAGE_SIZE)


def _bn_buffers(detector: Detector) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in detector.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.fixture(params=NAMES)
def detector(request: pytest.FixtureRequest) -> Detector:
    return _build(request.param)


def test_registry_lists_builtin_family() -> None:
    assert {"yolo-lite-n", "yolo-lite-s", "yolo-lite-m"} <= set(NAMES)
    assert all(isinstance(desc, str) and desc for desc in list_detectors().values())


def test_build_sets_arch_and_metadata(detector: Detector) -> None:
    assert detector.arch in NAMES
    assert detector.class_names == CLASS_NAMES
    assert detector.num_classes == 3
    assert detector.image_size == IMAGE_SIZE


def test_unknown_name_raises_with_valid_names() -> None:
    with pytest.raises(DiodeError) as excinfo:
        build_detector("yolo-lite-xxl", class_names=CLASS_NAMES, image_size=IMAGE_SIZE)
    message = str(excinfo.value)
    assert "yolo-lite-xxl" in message
    assert len(message.splitlines()) == 1
    for name in NAMES:
        assert name in message


def test_registering_a_name_twice_raises() -> None:
    with pytest.raises(ValueError, match="yolo-lite-n"):
        register("yolo-lite-n", "duplicate")(lambda **kwargs: None)


def test_empty_class_names_raise() -> None:
    with pytest.raises(ValueError, match="class_names"):
        build_detector("yolo-lite-n", class_names=[], image_size=IMAGE_SIZE)


@pytest.mark.parametrize("name, low, high", [
    ("yolo-lite-n", 0, 0.5e6), ("yolo-lite-s", 0.7e6, 1.6e6), ("yolo-lite-m", 3e6, 5e6)])
def test_parameter_counts(name: str, low: float, high: float) -> None:
    model = build_detector(name, class_names=[f"c{i}" for i in range(8)], image_size=IMAGE_SIZE)
    count = sum(p.numel() for p in model.parameters())
    assert low < count < high, count


def test_loss_returns_finite_named_scalars(detector: Detector) -> None:
    with detector.loss_mode():
        terms = detector.loss(_images(), _targets())
    assert set(terms) == set(detector.loss_weights) and terms
    for key, value in terms.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert torch.isfinite(value), (key, value)
    # With real positives every term contributes something.
    assert all(float(v.detach()) > 0 for v in terms.values()), terms
    weighted = detector.weighted_loss(terms)
    expected = sum(detector.loss_weights[k] * terms[k] for k in terms)
    assert torch.allclose(weighted, expected)


def test_gradients_reach_the_images(detector: Detector) -> None:
    images = _images().requires_grad_(True)
    with detector.loss_mode():
        detector.weighted_loss(detector.loss(images, _targets())).backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    # Both images of the batch get a gradient (no per-image graph break).
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()


def test_bn_layers_finds_every_batchnorm(detector: Detector) -> None:
    expected = [name for name, m in detector.named_modules() if isinstance(m, BN_TYPES)]
    found = detector.bn_layers()
    assert bool(expected) == (detector.arch not in BN_FREE)
    assert [name for name, _ in found] == expected
    assert all(isinstance(m, BN_TYPES) for _, m in found)


def test_loss_mode_keeps_running_statistics(detector: Detector) -> None:
    before = _bn_buffers(detector)
    if detector.arch in BN_FREE:
        assert not before
        pytest.skip(f"{detector.arch} has no batch norm")
    assert before
    images = _images().requires_grad_(True)
    with detector.loss_mode():
        assert detector.training
        assert all(not bn.training for _, bn in detector.bn_layers())
        for _ in range(2):
            detector.weighted_loss(detector.loss(images, _targets())).backward()
    after = _bn_buffers(detector)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # Sanity: the same step in plain train mode does move them (the check above can fail).
    detector.train()
    detector.loss(images, _targets())
    moved = _bn_buffers(detector)
    assert any(not torch.equal(before[n], moved[n]) for n in before)


@pytest.mark.parametrize("initial", ["train", "eval", "mixed"])
def test_loss_mode_restores_modes(detector: Detector, initial: str) -> None:
    detector.train(initial == "train")
    if initial == "mixed":
        detector.train()
        if detector.bn_layers():
            detector.bn_layers()[0][1].eval()
        list(detector.children())[-1].eval()
    modes = {name: m.training for name, m in detector.named_modules()}
    with detector.loss_mode():
        pass
    assert {name: m.training for name, m in detector.named_modules()} == modes
    with pytest.raises(RuntimeError, match="boom"):
        with detector.loss_mode():
            raise RuntimeError("boom")
    assert {name: m.training for name, m in detector.named_modules()} == modes


def test_predict_follows_the_data_contract(detector: Detector) -> None:
    detector.eval()
    images = _images(batch=3, seed=1)
    predictions = detector.predict(images)
    assert len(predictions) == 3
    height, width = IMAGE_SIZE
    max_detections = getattr(detector, "max_detections", None)
    for p in predictions:
        assert set(p) >= {"boxes", "labels", "scores"}
        boxes, labels, scores = p["boxes"], p["labels"], p["scores"]
        n = len(boxes)
        assert boxes.dtype.is_floating_point and boxes.shape == (n, 4)
        assert labels.dtype == torch.int64 and labels.shape == (n,)
        assert scores.dtype.is_floating_point and scores.shape == (n,)
        if max_detections is not None:
            assert n <= max_detections
        if n:
            assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
            assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
            assert (boxes[:, 2:] >= boxes[:, :2]).all()
            assert (labels >= 0).all() and (labels < detector.num_classes).all()
            assert (scores >= 0).all() and (scores <= 1).all()


def test_predict_in_eval_mode_does_not_touch_bn(detector: Detector) -> None:
    detector.eval()
    before = _bn_buffers(detector)
    detector.predict(_images())
    assert all(torch.equal(before[k], v) for k, v in _bn_buffers(detector).items())


@pytest.mark.parametrize("empty", ["all", "some"])
def test_empty_targets_give_finite_losses(detector: Detector, empty: str) -> None:
    no_boxes = _target([], [])
    targets = [no_boxes, no_boxes] if empty == "all" else [_targets()[0], no_boxes]
    images = _images().requires_grad_(True)
    with detector.loss_mode():
        terms = detector.loss(images, targets)
        total = detector.weighted_loss(terms)
        total.backward()
    assert set(terms) == set(detector.loss_weights)
    assert all(torch.isfinite(v) for v in terms.values()), terms
    assert torch.isfinite(images.grad).all()


def test_input_of_unsupported_size_raises(detector: Detector) -> None:
    images = _images(size=(64, 80))  # not a multiple of 32, and not the detector's image_size
    with pytest.raises(ValueError, match=_size_error(detector.arch)):
        detector.loss(images, [_target([], []), _target([], [])])
    detector.eval()
    with pytest.raises(ValueError, match=_size_error(detector.arch)):
        detector.predict(images)


# ----- yolo-lite specifics ---------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [(50, 64), (64, 100), (16, 64)])
def test_yolo_lite_image_size_must_be_multiple_of_32(image_size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detector("yolo-lite-n", class_names=CLASS_NAMES, image_size=image_size)


def test_yolo_lite_empty_and_capped_predictions() -> None:
    detector = _build("yolo-lite-n").eval()
    assert isinstance(detector, YoloLite)
    images = _images()
    empty = detector.predict(images, score_thresh=1.0)
    for p in empty:
        assert p["boxes"].shape == (0, 4) and p["labels"].shape == (0,) and p["scores"].shape == (0,)
    detector.max_detections = 5
    capped = detector.predict(images, score_thresh=0.0)
    assert [len(p["boxes"]) for p in capped] == [5, 5]
    for p in capped:
        assert (p["scores"][:-1] >= p["scores"][1:]).all()  # NMS keeps them best first


def test_yolo_lite_no_positive_means_zero_box_and_cls() -> None:
    detector = _build("yolo-lite-n")
    with detector.loss_mode():
        terms = detector.loss(_images(), [_target([], []), _target([], [])])
    assert float(terms["box"].detach()) == 0.0 and float(terms["cls"].detach()) == 0.0
    assert float(terms["obj"].detach()) > 0.0


# ----- base-class helpers on a toy detector ----------------------------------------------------


class _Toy(Detector):
    def __init__(self) -> None:
        super().__init__(["a"], (32, 32))
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.frozen = FrozenBatchNorm2d(4)
        self.drop = nn.Dropout(0.5)


def test_bn_layers_counts_frozen_batchnorm() -> None:
    toy = _Toy()
    assert [name for name, _ in toy.bn_layers()] == ["bn", "frozen"]


def test_loss_mode_trains_heads_but_not_bn() -> None:
    toy = _Toy().eval()
    with toy.loss_mode():
        assert toy.training and toy.drop.training and toy.conv.training
        assert not toy.bn.training and not toy.frozen.training
    assert not any(m.training for m in toy.modules())


class _KeepsDropoutOff(nn.Module):
    """A module whose own train() keeps its dropout in eval mode (as MobileNetV2FPN keeps its BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(4)

    def train(self, mode: bool = True) -> "_KeepsDropoutOff":
        super().train(mode)
        self.drop.eval()
        return self


@pytest.mark.parametrize("with_override", [False, True])
def test_loss_mode_sets_what_train_then_eval_on_each_bn_layer_sets(with_override: bool) -> None:
    """loss_mode() sets each module's flag directly when no module overrides train(), and calls
    train() when one does: either way the modes are those of train() followed by eval() on every
    BN layer (its submodules included), and a module's own train() is honoured."""
    toy = _Toy()
    toy.bn.add_module("inner", nn.Identity())  # a BN layer with a child: eval() reaches it too
    if with_override:
        toy.block = _KeepsDropoutOff()
    toy.eval()
    reference = copy.deepcopy(toy).train()
    for _, bn in reference.bn_layers():
        bn.eval()
    expected = {name: m.training for name, m in reference.named_modules()}
    assert not expected["bn.inner"] and expected["drop"]
    if with_override:
        assert not expected["block.drop"] and not expected["block.bn"] and expected["block"]
    with toy.loss_mode():
        assert {name: m.training for name, m in toy.named_modules()} == expected
    assert not any(m.training for m in toy.modules())


def test_loss_on_host_targets_makes_no_blocking_device_copy(detector: Detector, blocking_copies) -> None:
    """The loss (forward and backward) moves host targets to the model's device in non-blocking
    copies only: a blocking one would make the host wait for the GPU every synthesis iteration."""
    images = _images().requires_grad_(True)
    with blocking_copies() as seen:
        detector.weighted_loss(detector.loss(images, _targets())).backward()
    assert images.grad is not None
    assert seen.calls == []


def test_channels_last_teacher_gives_the_same_loss_and_image_gradient(detector: Detector) -> None:
    """Synthesis runs the teacher in channels_last on the CPU by default: every detector's loss and
    its gradient with respect to the (NCHW) images are those of the contiguous teacher."""
    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        images = _images().requires_grad_(True)
        with detector.loss_mode():
            loss = detector.weighted_loss(detector.loss(images, _targets()))
        (grad,) = torch.autograd.grad(loss, images)
        return loss.detach(), grad

    loss, grad = loss_and_grad()
    detector.to(memory_format=torch.channels_last)
    loss_cl, grad_cl = loss_and_grad()
    assert torch.allclose(loss_cl, loss, rtol=1e-4, atol=1e-5)
    # Summation order differs between the layouts, and deep random-init networks (VGG-16 in
    # tv-ssd) amplify it in places (up to 2 % of the largest entry): the same direction.
    a, b = grad_cl.double().flatten(), grad.double().flatten()  # (gradients can be ~1e-12 here)
    assert float(a @ b / (a.norm() * b.norm())) > 0.9999
