"""Tiling: compose several synthetic images into one multi-object image.

METHOD.md section 2: DIODE built images with several objects at smaller scales from a grid of
downscaled one-box images, boxes mapped accordingly. The official code does not contain this step,
so this version is our own design: consecutive groups of ``rows * cols`` images fill a grid row by
row, each image resized to one cell. Plain tensor ops, so gradients reach the source pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diode.types import ImageSize, Target


def tile_images(
    images: torch.Tensor,
    targets: list[Target],
    grid: tuple[int, int],
    out_size: ImageSize,
    *,
    min_box_side: float = 2.0,
) -> tuple[torch.Tensor, list[Target]]:
    """Tile groups of ``rows * cols`` images into ``[B // (rows * cols), 3, H, W]`` images.

    images: ``[B, 3, h, w]``; targets: B targets in the ``h x w`` frame. Image ``j`` of a group
    goes to cell ``(j // cols, j % cols)``, resized (bilinear, antialiased) to
    ``(H // rows, W // cols)``; ``H`` and ``W`` must be divisible by ``rows`` and ``cols``.
    Boxes are scaled and offset into their cell; boxes narrower or shorter than
    ``min_box_side`` pixels after scaling are dropped. The last ``B % (rows * cols)`` images are
    ignored.
    """
    rows, cols = (int(g) for g in grid)
    out_h, out_w = (int(s) for s in out_size)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be (rows, cols) >= 1, got {tuple(grid)}")
    if out_h < 1 or out_w < 1 or out_h % rows or out_w % cols:
        raise ValueError(
            f"out_size {tuple(out_size)} must be positive and divisible by grid {(rows, cols)}"
        )
    if images.ndim != 4:
        raise ValueError(f"images must be [B, 3, h, w], got shape {tuple(images.shape)}")
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")

    per_tile = rows * cols
    count = len(images) // per_tile
    _, channels, src_h, src_w = images.shape
    cell_h, cell_w = out_h // rows, out_w // cols

    cells = images[: count * per_tile]
    if (src_h, src_w) != (cell_h, cell_w):
        cells = F.interpolate(
            cells, size=(cell_h, cell_w), mode="bilinear", align_corners=False, antialias=True
        )
    # [n * rows * cols, C, ch, cw] -> [n, C, rows, ch, cols, cw] -> [n, C, H, W]
    tiled = (
        cells.reshape(count, rows, cols, channels, cell_h, cell_w)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(count, channels, out_h, out_w)
    )

    sx, sy = cell_w / src_w, cell_h / src_h
    tiled_targets: list[Target] = []
    for n in range(count):
        boxes, labels = [], []
        for j in range(per_tile):
            target = targets[n * per_tile + j]
            row, col = divmod(j, cols)
            box = target["boxes"].to(torch.float32)
            box = box * box.new_tensor([sx, sy, sx, sy]) + box.new_tensor(
                [col * cell_w, row * cell_h, col * cell_w, row * cell_h]
            )
            keep = ((box[:, 2] - box[:, 0]) >= min_box_side) & (
                (box[:, 3] - box[:, 1]) >= min_box_side
            )
            boxes.append(box[keep])
            labels.append(target["labels"][keep].to(torch.int64))
        tiled_targets.append(
            {
                "boxes": torch.cat(boxes).reshape(-1, 4),
                "labels": torch.cat(labels).reshape(-1),
            }
        )
    return tiled, tiled_targets
