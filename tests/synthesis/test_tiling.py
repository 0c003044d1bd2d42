"""Tiling: pixels land in their cell, boxes follow exactly, gradients reach the sources."""

from __future__ import annotations

import pytest
import torch

from diode.synthesis.tiling import tile_images

COLOURS = torch.tensor(
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
)


def solid(n: int, height: int, width: int) -> torch.Tensor:
    return COLOURS[:n, :, None, None].expand(n, 3, height, width).clone()


def target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_two_by_two_colours_and_boxes() -> None:
    # Sources 10 x 12 (h, w) into 12 x 16 cells of 6 x 8: sx = 8 / 12, sy = 6 / 10.
    images = solid(4, 10, 12)
    targets = [
        target([[0.0, 0.0, 12.0, 10.0]], [0]),
        target([[3.0, 5.0, 9.0, 10.0]], [1]),
        target([[6.0, 0.0, 12.0, 5.0], [0.0, 0.0, 2.0, 2.0]], [2, 3]),  # second: 1.33 px, dropped
        target([], []),
    ]
    tiled, tiled_targets = tile_images(images, targets, (2, 2), (12, 16))
    assert tiled.shape == (1, 3, 12, 16) and len(tiled_targets) == 1
    quadrants = [(slice(0, 6), slice(0, 8)), (slice(0, 6), slice(8, 16)),
                 (slice(6, 12), slice(0, 8)), (slice(6, 12), slice(8, 16))]
    for colour, (rows, cols) in zip(COLOURS, quadrants):
        cell = tiled[0, :, rows, cols]
        assert torch.allclose(cell, colour[:, None, None].expand_as(cell), atol=1e-6)
    expected = torch.tensor(
        [
            [0.0, 0.0, 8.0, 6.0],  # cell (0, 0): the whole cell
            [8.0 + 2.0, 3.0, 8.0 + 6.0, 6.0],  # cell (0, 1): x offset 8
            [4.0, 6.0 + 0.0, 8.0, 6.0 + 3.0],  # cell (1, 0): y offset 6
        ]
    )
    assert torch.allclose(tiled_targets[0]["boxes"], expected, atol=1e-5)
    assert tiled_targets[0]["labels"].tolist() == [0, 1, 2]


def test_row_major_non_square_grid_and_leftovers() -> None:
    images = solid(4, 8, 8)
    targets = [target([[0.0, 0.0, 8.0, 8.0]], [k]) for k in range(4)]
    tiled, tiled_targets = tile_images(images, targets, (1, 3), (8, 24))
    assert tiled.shape == (1, 3, 8, 24)  # the fourth image is left over
    for k in range(3):
        assert torch.equal(tiled[0, :, 0, 8 * k], COLOURS[k])
    assert torch.equal(
        tiled_targets[0]["boxes"],
        torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [16.0, 0.0, 24.0, 8.0]]),
    )
    empty, none = tile_images(images[:2], targets[:2], (2, 2), (8, 8))
    assert empty.shape == (0, 3, 8, 8) and none == []


def test_out_size_must_divide_by_grid() -> None:
    with pytest.raises(ValueError, match="divisible"):
        tile_images(solid(4, 8, 8), [target([], [])] * 4, (2, 2), (9, 8))


def test_gradient_reaches_the_tiled_inputs_only() -> None:
    images = torch.rand((5, 3, 10, 10), generator=torch.Generator().manual_seed(0))
    images.requires_grad_(True)
    tiled, _ = tile_images(images, [target([], [])] * 5, (2, 2), (10, 10))
    (tiled * torch.arange(tiled.numel()).reshape(tiled.shape)).sum().backward()
    assert images.grad is not None
    assert (images.grad[:4].abs().sum(dim=(1, 2, 3)) > 0).all()
    assert torch.equal(images.grad[4], torch.zeros(3, 10, 10))
