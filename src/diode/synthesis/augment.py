"""Differentiable, box-aware augmentation of the images being synthesised (METHOD.md section 1).

Re-sampled every iteration and vectorised over the batch: roll jitter (one gather per axis),
horizontal flip, optional zoom, brightness, contrast and random erasing. Boxes follow the
geometry: shifted (and flipped / scaled), clamped to the image, dropped when their area falls
below 1 px^2. Gradients flow to the input pixels through every operation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diode.config import SynthAugmentConfig
from diode.types import Target


def _roll(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-image circular shift of images [B, C, H, W] by integer (dx, dy) [B]."""
    b, c, h, w = images.shape
    cols = (torch.arange(w, device=images.device)[None] - dx[:, None]) % w  # [B, W]
    rows = (torch.arange(h, device=images.device)[None] - dy[:, None]) % h  # [B, H]
    images = images.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    return images.gather(2, rows[:, None, :, None].expand(b, c, h, w))


def augment_synthesis(images: torch.Tensor, targets: list[Target], cfg: SynthAugmentConfig, jitter: int,
                      gen: torch.Generator) -> tuple[torch.Tensor, list[Target]]:
    """images [B, 3, H, W] -> (augmented images, targets in the augmented frame); `jitter` in px.

    Targets are expected (and returned) on the CPU.
    """
    b, _, h, w = images.shape
    device = images.device
    # All random draws happen on the CPU generator; the geometry needed for the boxes stays on
    # the CPU (targets live there), the rest goes to the device in one transfer: no host syncs.
    u_cpu = torch.rand((b, 10), generator=gen)
    normal = torch.randn((b, 2), generator=gen).to(device)
    dx_cpu = ((u_cpu[:, 0] * (2 * jitter + 1)).floor() - jitter).long()
    dy_cpu = ((u_cpu[:, 1] * (2 * jitter + 1)).floor() - jitter).long()
    flip_cpu = u_cpu[:, 2] < cfg.flip_p
    lo, hi = cfg.scale
    zoom_cpu = lo * (hi / lo) ** u_cpu[:, 3]
    u = u_cpu.to(device)
    dx, dy, flip, zoom = dx_cpu.to(device), dy_cpu.to(device), flip_cpu.to(device), zoom_cpu.to(device)

    out = _roll(images, dx, dy) if jitter > 0 else images
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    zooming = hi > lo or lo != 1.0
    if zooming:  # zoom about the centre; content leaving the frame is cut, new border is 0
        theta = torch.zeros(b, 2, 3, device=device)
        theta[:, 0, 0] = 1 / zoom
        theta[:, 1, 1] = 1 / zoom
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    out = out + normal[:, 0, None, None, None] * cfg.brightness
    out = out * (1 + normal[:, 1, None, None, None] * cfg.contrast)

    erase = u[:, 4] < cfg.erase_p
    area = (cfg.erase_area[0] + u[:, 5] * (cfg.erase_area[1] - cfg.erase_area[0])) * h * w
    log_lo, log_hi = torch.log(torch.tensor(cfg.erase_aspect, device=device))
    aspect = torch.exp(log_lo + u[:, 6] * (log_hi - log_lo))
    eh = (area * aspect).sqrt().clamp(max=h)
    ew = (area / aspect).sqrt().clamp(max=w)
    ey = u[:, 7] * (h - eh)
    ex = u[:, 8] * (w - ew)
    ys = torch.arange(h, device=device)[None, :, None]
    xs = torch.arange(w, device=device)[None, None, :]
    inside = ((ys >= ey[:, None, None]) & (ys < (ey + eh)[:, None, None])
              & (xs >= ex[:, None, None]) & (xs < (ex + ew)[:, None, None]) & erase[:, None, None])
    out = out * (~inside)[:, None].to(out.dtype)

    new_targets = []
    centre = torch.tensor([w / 2, h / 2, w / 2, h / 2])
    for i, t in enumerate(targets):
        boxes = t["boxes"].float() + torch.stack([dx_cpu[i], dy_cpu[i], dx_cpu[i], dy_cpu[i]]).float()
        if flip_cpu[i]:
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        if zooming:
            boxes = (boxes - centre) * zoom_cpu[i] + centre
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)
        keep = (boxes[:, 2:] - boxes[:, :2]).prod(1) >= 1.0
        new_targets.append({"boxes": boxes[keep], "labels": t["labels"][keep]})
    return out, new_targets
