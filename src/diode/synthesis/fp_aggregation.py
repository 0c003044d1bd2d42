"""False-positive aggregation: promote the teacher's confident unrequested detections to targets.

While the pixels are optimised, the teacher starts to see objects nobody asked for (context the
BN prior pulls in). DIODE (METHOD.md section 2) does not let the task loss suppress them: on a
fixed schedule it runs the teacher on the un-augmented images and appends confident, new,
reasonably sized detections to that image's targets, which are never removed. The schedule is
`FPConfig.due`, independent of any saving cadence; the selection is `aggregate_false_positives`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_area, box_iou, clip_boxes_to_image

from diode.types import ImageSize, Prediction, Target


@dataclass
class FPConfig:
    """When and how false positives become targets (paper values as defaults)."""

    enabled: bool = False  # aggregate at all
    start: int = 800  # first (0-based) iteration that aggregates
    every: int = 100  # aggregate every this many iterations from `start`
    stop: int | None = None  # last iteration allowed to aggregate (inclusive); None = until the end
    nms_score_thresh: float = 0.05  # teacher's score threshold before NMS when predicting
    nms_iou_thresh: float = 0.5  # teacher's NMS IoU threshold when predicting
    score_thresh: float = 0.2  # keep detections scoring strictly above this
    max_iou: float = 0.35  # keep detections whose IoU with every existing target is below this
    min_area: float = 0.01  # smallest kept box area, fraction of H * W
    max_area: float = 0.85  # largest kept box area, fraction of H * W
    max_per_image: int = 8  # no image grows past this many targets

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"FPConfig.start must be >= 0, got {self.start}")
        if self.every < 1:
            raise ValueError(f"FPConfig.every must be >= 1, got {self.every}")
        if self.stop is not None and self.stop < self.start:
            raise ValueError(f"FPConfig.stop must be None or >= start, got {self.stop}")
        for name in (
            "nms_score_thresh", "nms_iou_thresh", "score_thresh", "max_iou", "min_area", "max_area"
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FPConfig.{name} must be in [0, 1], got {value}")
        if self.min_area > self.max_area:
            raise ValueError(
                f"FPConfig.min_area must be <= max_area, got {self.min_area} > {self.max_area}"
            )
        if self.max_per_image < 1:
            raise ValueError(f"FPConfig.max_per_image must be >= 1, got {self.max_per_image}")

    def due(self, iteration: int) -> bool:
        """Whether 0-based ``iteration`` aggregates false positives."""
        return (
            self.enabled
            and iteration >= self.start
            and (iteration - self.start) % self.every == 0
            and (self.stop is None or iteration <= self.stop)
        )


def _select(
    prediction: Prediction, target: Target, image_size: ImageSize, cfg: FPConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(boxes [M, 4], labels [M])`` for one image, on the target's device."""
    device = target["boxes"].device
    room = cfg.max_per_image - len(target["boxes"])
    boxes = prediction["boxes"].detach().to(device=device, dtype=torch.float32).reshape(-1, 4)
    empty = (boxes.new_zeros((0, 4)), torch.zeros((0,), dtype=torch.int64, device=device))
    if room <= 0 or len(boxes) == 0:
        return empty
    scores = prediction["scores"].detach().to(device).reshape(-1)
    labels = prediction["labels"].to(device=device, dtype=torch.int64).reshape(-1)

    height, width = image_size
    boxes = clip_boxes_to_image(boxes, (height, width))
    area = box_area(boxes) / float(height * width)
    keep = (scores > cfg.score_thresh) & (area >= cfg.min_area) & (area <= cfg.max_area)
    if len(target["boxes"]):
        # Any class: a detection on top of a requested object is that object, not a new one.
        keep &= box_iou(boxes, target["boxes"].to(torch.float32)).amax(dim=1) < cfg.max_iou
    candidates = keep.nonzero().flatten()
    if len(candidates) == 0:
        return empty
    order = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]
    boxes, labels = boxes[order], labels[order]

    # Greedy by score among the new ones: a candidate overlapping an accepted one is a duplicate.
    clash = (box_iou(boxes, boxes) >= cfg.max_iou).cpu()
    accepted: list[int] = []
    for i in range(len(boxes)):
        if len(accepted) == room:
            break
        if not clash[i, accepted].any():
            accepted.append(i)
    index = torch.tensor(accepted, dtype=torch.int64, device=device)
    return boxes[index], labels[index]


def aggregate_false_positives(
    predictions: list[Prediction],
    targets: list[Target],
    image_size: ImageSize,
    cfg: FPConfig,
) -> tuple[list[Target], int]:
    """Append the teacher's confident new detections to the targets of the same images.

    predictions: the teacher's detections (``boxes``, ``labels``, ``scores``) on the
    un-augmented images, already NMSed; they may live on another device than the targets.
    Per image a detection is kept when its score is above ``cfg.score_thresh``, its IoU with
    every existing target box (any class) is below ``cfg.max_iou``, and its area is within
    ``[cfg.min_area, cfg.max_area]`` of ``H * W``; among the kept, greedily by score, one
    overlapping an already accepted new box with IoU >= ``cfg.max_iou`` is dropped. Accepted
    boxes are appended highest score first until the image holds ``cfg.max_per_image`` targets.
    Returns new target dicts (the inputs are not modified) and the number of boxes added.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    merged: list[Target] = []
    added = 0
    for prediction, target in zip(predictions, targets):
        new_boxes, new_labels = _select(prediction, target, image_size, cfg)
        added += len(new_boxes)
        merged.append(
            {
                "boxes": torch.cat([target["boxes"], new_boxes.to(target["boxes"].dtype)]),
                "labels": torch.cat([target["labels"], new_labels]),
            }
        )
    return merged, added
