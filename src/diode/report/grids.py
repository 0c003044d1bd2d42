"""Image grids with boxes drawn on them (torchvision's drawing utilities)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import draw_bounding_boxes, make_grid

from diode.io import save_png
from diode.types import Target

PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3"]


def draw_boxes(image: torch.Tensor, target: Target, class_names: list[str], upscale: int = 2) -> torch.Tensor:
    """image [3, H, W] (uint8 or float in [0, 1]) -> uint8 [3, H*u, W*u] with labelled boxes.

    Scores, when present in `target`, are appended to the label text.
    """
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    image = image.cpu()
    if upscale > 1:
        image = image.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    boxes = target["boxes"].detach().cpu().float() * upscale
    labels = target["labels"].detach().cpu().tolist()
    if len(boxes) == 0:
        return image
    scores = target.get("scores")
    texts = [class_names[k] if 0 <= k < len(class_names) else str(k) for k in labels]
    if scores is not None:
        texts = [f"{t} {s:.2f}" for t, s in zip(texts, scores.detach().cpu().tolist())]
    colors = [PALETTE[k % len(PALETTE)] for k in labels]
    return draw_bounding_boxes(image, boxes, labels=texts, colors=colors, width=1)


def save_grid(path: str | Path, images: torch.Tensor, targets: list[Target], class_names: list[str],
              nrow: int = 4, upscale: int = 2) -> None:
    """Save a PNG grid of `images` [B, 3, H, W] with their boxes drawn (atomic write)."""
    tiles = [draw_boxes(img, t, class_names, upscale) for img, t in zip(images, targets)]
    grid = make_grid(torch.stack(tiles), nrow=nrow, padding=2, pad_value=255)
    save_png(path, grid.permute(1, 2, 0).numpy())
