"""Target samplers: geometry, class balance, determinism, and the real-layout ablation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from diode.data.coco import read_coco, write_coco
from diode.data.dataset import DetectionDataset
from diode.errors import DiodeError
from diode.synthesis.targets import (
    make_sampler,
    sample_multi_box,
    sample_one_box,
    targets_from_dataset,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("image_size", [(64, 64), (48, 96), (120, 40)])
def test_one_box_geometry_and_labels(image_size: tuple[int, int]) -> None:
    height, width = image_size
    targets = sample_one_box(256, image_size, 5, gen(), min_side=0.2, max_side=0.8)
    assert len(targets) == 256
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    assert all(len(t["boxes"]) == 1 and len(t["labels"]) == 1 for t in targets)
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    eps = 1e-4
    assert (boxes[:, :2] >= -eps).all()
    assert (boxes[:, 2] <= width + eps).all() and (boxes[:, 3] <= height + eps).all()
    fw = (boxes[:, 2] - boxes[:, 0]) / width
    fh = (boxes[:, 3] - boxes[:, 1]) / height
    assert fw.min() >= 0.2 - eps and fw.max() <= 0.8 + eps
    assert fh.min() >= 0.2 - eps and fh.max() <= 0.8 + eps
    # Independent draws cover the range and width does not determine height.
    assert fw.min() < 0.3 and fw.max() > 0.7 and not torch.allclose(fw, fh)
    assert labels.min() >= 0 and labels.max() <= 4
    assert set(labels.tolist()) == set(range(5))


@pytest.mark.parametrize("sampler", ["one-box", "multi-box"])
def test_max_aspect_caps_the_long_side_within_the_range(sampler: str) -> None:
    options = {"min_side": 0.2, "max_side": 0.8}
    free = make_sampler(sampler, **options)(300, (64, 96), 4, gen(3))
    capped = make_sampler(sampler, max_aspect=1.5, **options)(300, (64, 96), 4, gen(3))

    def sides(targets):
        boxes = torch.cat([t["boxes"] for t in targets])
        return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]

    w, h = sides(free)
    assert (torch.maximum(w / h, h / w) > 2).any()  # without the cap, elongated boxes occur
    w, h = sides(capped)
    assert (torch.maximum(w / h, h / w) <= 1.5 + 1e-5).all()
    assert (w >= 0.2 * 96 - 1e-3).all() and (h >= 0.2 * 64 - 1e-3).all()
    assert (w <= 0.8 * 96 + 1e-3).all() and (h <= 0.8 * 64 + 1e-3).all()
    if sampler == "one-box":  # same draws: a box already within the cap is unchanged
        for a, b in zip(free, capped):
            bw, bh = a["boxes"][0, 2] - a["boxes"][0, 0], a["boxes"][0, 3] - a["boxes"][0, 1]
            if max(bw / bh, bh / bw) <= 1.5:
                assert torch.equal(a["boxes"], b["boxes"])
            assert torch.equal(a["labels"], b["labels"])
    with pytest.raises(DiodeError, match="max_aspect"):
        sample_one_box(2, (32, 32), 3, gen(), max_aspect=0.5)


def test_one_box_same_seed_same_targets() -> None:
    a = sample_one_box(8, (32, 48), 3, gen(7))
    b = sample_one_box(8, (32, 48), 3, gen(7))
    c = sample_one_box(8, (32, 48), 3, gen(8))
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a, b))
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a, c))


def test_one_box_rejects_bad_sides() -> None:
    with pytest.raises(DiodeError, match="min_side"):
        sample_one_box(2, (32, 32), 3, gen(), min_side=0.9, max_side=0.5)


def test_multi_box_counts_overlap_and_balance() -> None:
    num_classes = 7
    targets = sample_multi_box(
        200, (60, 90), num_classes, gen(3), boxes_per_image=(2, 5), max_iou=0.3
    )
    assert len(targets) == 200
    sizes = [len(t["boxes"]) for t in targets]
    assert max(sizes) <= 5 and min(sizes) >= 1
    assert Counter(sizes)[5] > 0  # small boxes fit easily: the upper end is reached
    for t in targets:
        assert len(t["labels"]) == len(t["boxes"])
        boxes = t["boxes"]
        assert (boxes[:, :2] >= -1e-4).all()
        assert (boxes[:, 2] <= 90 + 1e-4).all() and (boxes[:, 3] <= 60 + 1e-4).all()
        iou = box_iou(boxes, boxes)
        iou.fill_diagonal_(0)
        assert iou.max() <= 0.3
    counts = Counter(torch.cat([t["labels"] for t in targets]).tolist())
    assert set(counts) == set(range(num_classes))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_multi_box_gives_up_on_boxes_that_cannot_fit() -> None:
    # Boxes of at least 0.9 of each side overlap each other by far more than 0.1.
    targets = sample_multi_box(
        10, (40, 40), 3, gen(), boxes_per_image=(3, 3), min_side=0.9, max_side=1.0,
        max_iou=0.1, max_tries=5,
    )
    assert all(len(t["boxes"]) == 1 for t in targets)


def test_make_sampler_registry() -> None:
    one = make_sampler("one-box", min_side=0.5, max_side=0.5)
    targets = one(4, (20, 40), 2, gen(), "cpu")
    assert len(targets) == 4
    sides = targets[0]["boxes"][0, 2:] - targets[0]["boxes"][0, :2]
    assert torch.allclose(sides, torch.tensor([20.0, 10.0]))
    multi = make_sampler("multi-box", boxes_per_image=(2, 2))
    assert all(len(t["boxes"]) <= 2 for t in multi(4, (64, 64), 2, gen(), "cpu"))
    with pytest.raises(DiodeError, match="multi-box.*one-box"):
        make_sampler("three-box")
    with pytest.raises(DiodeError, match="one-box"):
        make_sampler("one-box", boxes_per_image=(1, 2))


def _tiny_coco(tmp_path: Path) -> DetectionDataset:
    """Three images whose sizes differ from the working size; one declared at twice its size."""
    images = tmp_path / "images"
    images.mkdir()
    stored = {"a.png": (30, 40), "b.png": (50, 20), "c.png": (20, 30)}  # (h, w)
    for name, (h, w) in stored.items():
        Image.fromarray(np.full((h, w, 3), 90, dtype=np.uint8)).save(images / name)
    entries = [
        {"file_name": "a.png", "height": 30, "width": 40,
         "boxes": [[2.0, 3.0, 20.0, 25.0], [30.0, 10.0, 40.5, 29.0]], "labels": [0, 2]},
        {"file_name": "b.png", "height": 50, "width": 20,
         "boxes": [[1.5, 4.0, 18.0, 44.0]], "labels": [1]},
        # Annotation out of date: declared 40 x 60, stored 20 x 30; load rescales the boxes.
        {"file_name": "c.png", "height": 40, "width": 60,
         "boxes": [[6.0, 8.0, 30.0, 36.0]], "labels": [2]},
    ]
    write_coco(tmp_path / "annotations.json", ["x", "y", "z"], entries)
    return read_coco(tmp_path / "annotations.json")


def test_targets_from_dataset_match_load(tmp_path: Path) -> None:
    dataset = _tiny_coco(tmp_path)
    image_size = (48, 56)
    indices = [2, 0, 1, 0]
    targets = targets_from_dataset(dataset, indices, image_size)
    assert len(targets) == len(indices)
    for i, target in zip(indices, targets):
        _, expected = dataset.load(i, image_size)
        assert torch.equal(target["boxes"], expected["boxes"])
        assert torch.equal(target["labels"], expected["labels"])
    # Letterboxing mattered: a.png (30 x 40) is scaled by 1.4 and padded vertically by 3.
    assert torch.allclose(targets[1]["boxes"][0], torch.tensor([2.8, 7.2, 28.0, 38.0]))


def test_targets_from_dataset_errors(tmp_path: Path) -> None:
    empty = DetectionDataset(tmp_path, ["x"], [], source="empty")
    with pytest.raises(DiodeError, match="empty"):
        targets_from_dataset(empty, [0], (32, 32))
    with pytest.raises(DiodeError, match="index 3"):
        targets_from_dataset(_tiny_coco(tmp_path), [3], (32, 32))
