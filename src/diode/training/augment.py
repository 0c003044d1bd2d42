"""Batch-level detection augmentation: flip, scale/translate and HSV-style colour jitter.

Everything is vectorised over the batch (one `grid_sample` for all geometry, one matrix product
for colour), so augmentation costs a small fraction of a training step and runs on the batch's
device. Boxes follow the geometry exactly; boxes pushed mostly out of the image are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diode.config import AugmentConfig
from diode.types import Target

FILL = 114 / 255  # letterbox grey: out-of-image regions get the same value as dataset padding


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * (high - low) + low).to(device)


def _hue_matrices(angle: torch.Tensor) -> torch.Tensor:
    """[B] angles (radians) -> [B, 3, 3] RGB matrices rotating hue around the grey axis."""
    cos, sin = angle.cos(), angle.sin()
    k = 1 / 3 ** 0.5
    # Rodrigues' rotation about the unit vector (1, 1, 1) / sqrt(3).
    axis = torch.full((3,), k, device=angle.device)
    outer = axis[:, None] * axis[None, :]
    cross = torch.tensor([[0, -k, k], [k, 0, -k], [-k, k, 0]], device=angle.device)
    eye = torch.eye(3, device=angle.device)
    return (cos[:, None, None] * eye + sin[:, None, None] * cross + (1 - cos)[:, None, None] * outer)


def augment_batch(images: torch.Tensor, targets: list[Target], cfg: AugmentConfig,
                  gen: torch.Generator) -> tuple[torch.Tensor, list[Target]]:
    """images [B, 3, H, W] in [0, 1] -> augmented images and targets (new tensors)."""
    b, _, h, w = images.shape
    device = images.device
    flip = torch.where(torch.rand(b, generator=gen) < cfg.flip_p, -1.0, 1.0).to(device)
    scale = _uniform(b, *torch.tensor(cfg.scale).log().tolist(), gen, device).exp()
    shift = _uniform(2 * b, -cfg.translate, cfg.translate, gen, device).view(b, 2) * 2
    # Content moves u_out = (flip * scale * u_in + shift) in normalised [-1, 1] coordinates;
    # grid_sample needs the inverse map u_in = (u_out - shift) / (flip * scale).
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = 1 / (flip * scale)
    theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2] = -shift[:, 0] / (flip * scale)
    theta[:, 1, 2] = -shift[:, 1] / scale
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + FILL

    hue = _uniform(b, -cfg.hue, cfg.hue, gen, device) * 2 * torch.pi
    sat = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, gen, device)
    val = _uniform(b, 1 - cfg.value, 1 + cfg.value, gen, device)
    out = torch.einsum("bij,bjhw->bihw", _hue_matrices(hue), out)
    grey = out.mean(1, keepdim=True)
    out = ((grey + (out - grey) * sat[:, None, None, None]) * val[:, None, None, None]).clamp(0, 1)

    new_targets = []
    size = torch.tensor([w, h, w, h], device=device, dtype=torch.float32)
    for i, t in enumerate(targets):
        boxes = t["boxes"].to(device).float()
        u = boxes / size * 2 - 1
        u[:, 0::2] = u[:, 0::2] * flip[i]
        u = u * scale[i] + shift[i].repeat(2)
        if flip[i] < 0:
            u = u[:, [2, 1, 0, 3]]
        moved = (u + 1) / 2 * size
        area = (moved[:, 2:] - moved[:, :2]).prod(1)
        clipped = torch.stack([moved[:, 0].clamp(0, w), moved[:, 1].clamp(0, h),
                               moved[:, 2].clamp(0, w), moved[:, 3].clamp(0, h)], 1)
        wh = clipped[:, 2:] - clipped[:, :2]
        keep = (wh.prod(1) >= cfg.min_visible * area) & (wh.min(1).values >= 2)
        new_targets.append({"boxes": clipped[keep], "labels": t["labels"].to(device)[keep]})
    return out, new_targets
