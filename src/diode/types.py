"""The data contract shared by every module (as torchvision detection models use it).

- images: float tensor ``[B, 3, H, W]`` with pixels in [0, 1], not normalised; adapters own any
  normalisation.
- Target: ``{"boxes": float [N, 4] absolute pixel (x1, y1, x2, y2), "labels": int64 [N]}`` with
  0-based class indices into the detector's ``class_names``.
- Prediction: a Target plus ``"scores": float [N]``.
- Sizes are always ``(H, W)``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

Target = Dict[str, torch.Tensor]
Prediction = Dict[str, torch.Tensor]
ImageSize = Tuple[int, int]


def empty_target(device: torch.device | str = "cpu") -> Target:
    """A target with no objects."""
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32, device=device),
        "labels": torch.zeros((0,), dtype=torch.int64, device=device),
    }


__all__ = ["Target", "Prediction", "ImageSize", "empty_target"]
