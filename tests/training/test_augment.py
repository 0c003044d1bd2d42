"""Batch augmentation: exact flips, boxes that follow the pixels, dropping, range, determinism."""

from __future__ import annotations

import pytest
import torch

from diode.config import AugmentConfig
from diode.training.augment import augment_batch

H, W = 64, 96


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _no_colour(**kwargs) -> AugmentConfig:
    return AugmentConfig(**{"hue": 0.0, "saturation": 0.0, "value": 0.0, **kwargs})


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flip_is_exact() -> None:
    images = torch.rand(3, 3, H, W, generator=_gen(1))
    targets = [_target([[10, 5, 30, 40], [0, 0, 96, 64]], [0, 1]), _target([[50, 20, 90, 60]], [2]),
               _target([], [])]
    cfg = _no_colour(flip_p=1.0, scale=(1.0, 1.0), translate=0.0)
    out, new = augment_batch(images, targets, cfg, _gen())
    assert out.shape == images.shape
    assert torch.allclose(out, images.flip(-1), atol=1e-5)
    for before, after in zip(targets, new):
        b, a = before["boxes"], after["boxes"]
        assert a.shape == b.shape
        assert torch.allclose(a[:, 0], W - b[:, 2], atol=1e-4)
        assert torch.allclose(a[:, 2], W - b[:, 0], atol=1e-4)
        assert torch.allclose(a[:, 1::2], b[:, 1::2], atol=1e-4)
        assert torch.equal(after["labels"], before["labels"])


def test_identity_settings_change_nothing() -> None:
    images = torch.rand(2, 3, H, W, generator=_gen(2))
    targets = [_target([[10, 5, 30, 40]], [0]), _target([[50, 20, 90, 60]], [2])]
    cfg = _no_colour(flip_p=0.0, scale=(1.0, 1.0), translate=0.0)
    out, new = augment_batch(images, targets, cfg, _gen())
    assert torch.allclose(out, images, atol=1e-5)
    for before, after in zip(targets, new):
        assert torch.allclose(after["boxes"], before["boxes"], atol=1e-4)


def _bright_box(image: torch.Tensor) -> torch.Tensor | None:
    """Pixel-edge bounding box (x1, y1, x2, y2) of pixels brighter than 0.5 in every channel."""
    mask = (image > 0.5).all(0)
    if not mask.any():
        return None
    ys, xs = mask.nonzero(as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_boxes_follow_the_pixels_under_scale_and_translate() -> None:
    rects = [[20, 16, 50, 40], [40, 10, 80, 30], [8, 30, 30, 60], [30, 20, 66, 44],
             [50, 34, 90, 58], [12, 8, 40, 24], [36, 24, 60, 48], [24, 12, 72, 52]]
    images = torch.zeros(len(rects), 3, H, W)
    for i, (x1, y1, x2, y2) in enumerate(rects):
        images[i, :, y1:y2, x1:x2] = 1.0
    targets = [_target([r], [i % 3]) for i, r in enumerate(rects)]
    cfg = _no_colour(flip_p=0.0, scale=(0.7, 1.4), translate=0.15)
    out, new = augment_batch(images, targets, cfg, _gen(5))
    compared = 0
    moved = 0
    for i in range(len(rects)):
        if len(new[i]["boxes"]) == 0:
            continue
        assert len(new[i]["boxes"]) == 1
        assert torch.equal(new[i]["labels"], targets[i]["labels"])
        bright = _bright_box(out[i])
        assert bright is not None
        assert torch.allclose(new[i]["boxes"][0], bright, atol=1.0), (i, new[i]["boxes"][0], bright)
        compared += 1
        moved += int(not torch.allclose(new[i]["boxes"][0], targets[i]["boxes"][0], atol=2.0))
    assert compared >= 6
    assert moved >= 4  # the geometry really changed, so the comparison means something


def test_boxes_pushed_out_are_dropped_and_partial_ones_clipped() -> None:
    # Zoom x2 about the centre of a 64 x 64 image: u -> 2u in [-1, 1] coordinates.
    images = torch.rand(1, 3, 64, 64, generator=_gen(3))
    boxes = [[0, 0, 10, 10],     # corner: leaves the image entirely
             [0, 24, 24, 40],    # 1/3 of its zoomed width stays in: under min_visible = 0.4
             [8, 24, 32, 40],    # 2/3 stays in: kept, clipped at x = 0
             [28, 28, 36, 36]]   # centre: kept whole
    targets = [_target(boxes, [0, 1, 2, 0])]
    cfg = _no_colour(flip_p=0.0, scale=(2.0, 2.0), translate=0.0, min_visible=0.4)
    _, new = augment_batch(images, targets, cfg, _gen())
    assert torch.equal(new[0]["labels"], torch.tensor([2, 0]))
    expected = torch.tensor([[0, 16, 32, 48], [24, 24, 40, 40]], dtype=torch.float32)
    assert torch.allclose(new[0]["boxes"], expected, atol=1e-4)


def test_empty_targets_stay_empty() -> None:
    images = torch.rand(2, 3, H, W, generator=_gen(4))
    _, new = augment_batch(images, [_target([], []), _target([], [])], AugmentConfig(), _gen())
    for t in new:
        assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
        assert t["labels"].dtype == torch.int64


def test_output_stays_in_unit_range_and_inputs_untouched() -> None:
    images = torch.rand(4, 3, H, W, generator=_gen(6))
    images[0] = 1.0
    images[1] = 0.0
    original = images.clone()
    targets = [_target([[10, 10, 50, 50]], [1]) for _ in range(4)]
    boxes_before = [t["boxes"].clone() for t in targets]
    cfg = AugmentConfig(hue=0.5, saturation=0.9, value=0.9)
    out, _ = augment_batch(images, targets, cfg, _gen(7))
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(images, original)
    assert all(torch.equal(t["boxes"], b) for t, b in zip(targets, boxes_before))


@pytest.mark.parametrize("batch, seed, mosaic_p", [(4, 8, 0.0), (5, 10, 0.8)], ids=["plain", "mosaic"])
def test_same_seed_same_output(batch: int, seed: int, mosaic_p: float) -> None:
    images = torch.rand(batch, 3, H, W, generator=_gen(seed))
    targets = [_target([[10, 10, 50, 50], [60, 5, 90, 30]], [1, 2]) for _ in range(batch)]
    cfg = AugmentConfig(mosaic_p=mosaic_p)
    out_a, new_a = augment_batch(images, targets, cfg, _gen(11))
    out_b, new_b = augment_batch(images, targets, cfg, _gen(11))
    out_c, _ = augment_batch(images, targets, cfg, _gen(12))
    assert torch.equal(out_a, out_b)
    for a, b in zip(new_a, new_b):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.allclose(out_a, out_c)


@pytest.mark.parametrize("scale", [(0.0, 1.0), (1.5, 1.0)])
def test_config_rejects_bad_scale(scale: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=scale)
