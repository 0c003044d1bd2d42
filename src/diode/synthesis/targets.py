"""Target samplers: the boxes and classes each synthetic image is optimised to contain.

DIODE (METHOD.md section 2) conditions every synthetic image on a target drawn before
optimisation. `sample_one_box` is the paper's one-box sampling; `sample_multi_box` draws several
non-overlapping boxes with classes balanced over the batch; `targets_from_dataset` is the
"layout from real labels" ablation (not data-free: an upper bound). Randomness comes only from
the passed CPU `torch.Generator`; tensors are built on the CPU and then moved to ``device``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torchvision.ops import box_iou

from diode.data.dataset import DetectionDataset
from diode.errors import DiodeError
from diode.types import ImageSize, Target

# (batch_size, image_size, num_classes, gen, device) -> batch_size targets
Sampler = Callable[[int, ImageSize, int, torch.Generator, "torch.device | str"], list[Target]]


def _check_common(batch_size: int, image_size: ImageSize, num_classes: int) -> tuple[int, int]:
    """Validated ``(H, W)``; raise `DiodeError` naming the bad argument."""
    if batch_size < 0:
        raise DiodeError(f"batch_size must be >= 0, got {batch_size}")
    if num_classes < 1:
        raise DiodeError(f"num_classes must be >= 1, got {num_classes}")
    height, width = (int(s) for s in image_size)
    if height <= 0 or width <= 0:
        raise DiodeError(f"image_size must be positive (H, W), got {tuple(image_size)}")
    return height, width


def _check_sides(min_side: float, max_side: float) -> None:
    if not 0.0 < min_side <= max_side <= 1.0:
        raise DiodeError(
            f"need 0 < min_side <= max_side <= 1, got min_side={min_side}, max_side={max_side}"
        )


def _check_aspect(max_aspect: float | None) -> None:
    if max_aspect is not None and not max_aspect >= 1.0:
        raise DiodeError(f"max_aspect must be >= 1 (long side / short side) or None, got {max_aspect}")


def _random_boxes(
    n: int, height: int, width: int, min_side: float, max_side: float, gen: torch.Generator,
    max_aspect: float | None = None,
) -> torch.Tensor:
    """``n`` xyxy boxes ``[n, 4]`` with sides U(min_side, max_side) of the image side, inside it.

    With ``max_aspect`` the longer side (in pixels) is shortened to at most ``max_aspect`` times
    the shorter one (never below the shorter, so on a square image both stay within the range);
    the random draws are the same either way.
    """
    u = torch.rand((n, 4), generator=gen)
    box_w = (min_side + (max_side - min_side) * u[:, 0]) * width
    box_h = (min_side + (max_side - min_side) * u[:, 1]) * height
    if max_aspect is not None:
        box_w = torch.minimum(box_w, box_h * max_aspect)
        box_h = torch.minimum(box_h, box_w * max_aspect)
    # Top-left uniform over the positions that keep the whole box inside the image.
    x1 = u[:, 2] * (width - box_w)
    y1 = u[:, 3] * (height - box_h)
    return torch.stack([x1, y1, x1 + box_w, y1 + box_h], dim=1)


def sample_one_box(
    batch_size: int,
    image_size: ImageSize,
    num_classes: int,
    gen: torch.Generator,
    *,
    min_side: float = 0.2,
    max_side: float = 0.8,
    max_aspect: float | None = None,
    device: torch.device | str = "cpu",
) -> list[Target]:
    """The paper's one-box sampling: one box of a uniformly drawn class per image.

    Width and height are independently U(min_side, max_side) times the image width / height
    (the longer then capped at ``max_aspect`` times the shorter, if given; the paper has no cap);
    the box position is uniform over the positions that keep it inside the image.
    """
    height, width = _check_common(batch_size, image_size, num_classes)
    _check_sides(min_side, max_side)
    _check_aspect(max_aspect)
    boxes = _random_boxes(batch_size, height, width, min_side, max_side, gen, max_aspect)  # [B, 4]
    labels = torch.randint(num_classes, (batch_size,), generator=gen)  # [B]
    boxes, labels = boxes.to(device), labels.to(device)
    return [{"boxes": boxes[i : i + 1], "labels": labels[i : i + 1]} for i in range(batch_size)]


def sample_multi_box(
    batch_size: int,
    image_size: ImageSize,
    num_classes: int,
    gen: torch.Generator,
    *,
    boxes_per_image: tuple[int, int] = (1, 4),
    min_side: float = 0.1,
    max_side: float = 0.5,
    max_iou: float = 0.3,
    max_tries: int = 20,
    max_aspect: float | None = None,
    device: torch.device | str = "cpu",
) -> list[Target]:
    """Several boxes per image, mutually overlapping by at most ``max_iou``, balanced classes.

    Each image asks for k ~ U{lo..hi} boxes (``boxes_per_image`` inclusive). Each new box is
    drawn up to ``max_tries`` times until its IoU with every box already placed in that image is
    <= ``max_iou``; a box that never fits is given up, so an image may hold fewer than k. Labels
    are dealt to the placed boxes of the whole batch from consecutive random permutations of the
    classes, so class counts over the batch differ by at most one.
    """
    height, width = _check_common(batch_size, image_size, num_classes)
    _check_sides(min_side, max_side)
    _check_aspect(max_aspect)
    lo, hi = (int(k) for k in boxes_per_image)
    if not 0 <= lo <= hi:
        raise DiodeError(f"boxes_per_image must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
    if not 0.0 <= max_iou <= 1.0:
        raise DiodeError(f"max_iou must be in [0, 1], got {max_iou}")
    if max_tries < 1:
        raise DiodeError(f"max_tries must be >= 1, got {max_tries}")

    counts = torch.randint(lo, hi + 1, (batch_size,), generator=gen).tolist()
    per_image: list[torch.Tensor] = []
    for k in counts:
        placed = torch.zeros((0, 4))
        for _ in range(k):
            # All tries drawn at once; the first one that fits is taken.
            candidates = _random_boxes(max_tries, height, width, min_side, max_side, gen, max_aspect)
            if len(placed):
                fits = box_iou(candidates, placed).amax(dim=1) <= max_iou
                if not fits.any():
                    continue
                candidates = candidates[fits]
            placed = torch.cat([placed, candidates[:1]])
        per_image.append(placed)

    total = sum(len(b) for b in per_image)
    rounds = -(-total // num_classes)  # ceil
    dealt = [torch.randperm(num_classes, generator=gen) for _ in range(rounds)]
    labels = torch.cat(dealt)[:total] if dealt else torch.zeros((0,), dtype=torch.int64)

    targets: list[Target] = []
    start = 0
    for boxes in per_image:
        end = start + len(boxes)
        targets.append({"boxes": boxes.to(device), "labels": labels[start:end].to(device)})
        start = end
    return targets


def targets_from_dataset(
    dataset: DetectionDataset,
    indices: Sequence[int],
    image_size: ImageSize,
    device: torch.device | str = "cpu",
) -> list[Target]:
    """The real layouts of records ``indices``, mapped into the letterboxed ``image_size`` frame.

    Equal to the targets `DetectionDataset.load` returns, without decoding pixels: only image
    headers are read, because ``load`` letterboxes by the stored size (rescaling boxes when it
    differs from the declared one), clips boxes to the image and drops the ones left empty.
    """
    if len(dataset) == 0:
        raise DiodeError(f"{dataset.source}: dataset is empty, no layouts to take")
    out_h, out_w = (int(s) for s in image_size)
    if out_h <= 0 or out_w <= 0:
        raise DiodeError(f"image_size must be positive (H, W), got {tuple(image_size)}")
    targets: list[Target] = []
    for i in indices:
        if not 0 <= i < len(dataset):
            raise DiodeError(f"{dataset.source}: index {i} outside 0..{len(dataset) - 1}")
        target = dataset.target(i, (out_h, out_w))  # reads the image header, not its pixels
        targets.append({k: v.to(device) for k, v in target.items()})
    return targets


_SAMPLERS = {"one-box": sample_one_box, "multi-box": sample_multi_box}


def make_sampler(name: str, **kwargs: object) -> Sampler:
    """The sampler registered as ``name`` with its keyword options bound.

    Returns ``f(batch_size, image_size, num_classes, gen, device) -> list[Target]``. Unknown names
    and options unknown to the sampler raise `DiodeError` at once, not at the first call.
    """
    if name not in _SAMPLERS:
        raise DiodeError(f"unknown target sampler '{name}'; valid: {', '.join(sorted(_SAMPLERS))}")
    fn = _SAMPLERS[name]
    try:
        inspect.signature(fn).bind(0, (1, 1), 1, None, **kwargs)
    except TypeError as exc:
        raise DiodeError(f"target sampler '{name}': {exc}") from None
    if "device" in kwargs:
        raise DiodeError(f"target sampler '{name}': pass device at call time, not as an option")

    def sampler(
        batch_size: int,
        image_size: ImageSize,
        num_classes: int,
        gen: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> list[Target]:
        return fn(batch_size, image_size, num_classes, gen, device=device, **kwargs)

    return sampler
