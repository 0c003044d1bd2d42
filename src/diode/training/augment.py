"""Batch-level detection augmentation: mosaic, flip, scale/translate and HSV-style colour jitter.

Everything is vectorised over the batch (one `grid_sample` per mosaic quadrant, one for all other
geometry, one matrix product for colour), so augmentation costs a small fraction of a training
step and runs on the batch's device. Boxes follow the geometry exactly; boxes pushed mostly out of
the image (or out of their mosaic quadrant) are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diode.config import AugmentConfig
from diode.types import Target

FILL = 114 / 255  # letterbox grey: out-of-image regions get the same value as dataset padding
MOSAIC_CENTRE = (0.25, 0.75)  # range of the mosaic centre, as a fraction of each side


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


def _clip_boxes(moved: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                min_visible: float) -> tuple[torch.Tensor, torch.Tensor]:
    """moved [N, 4] boxes clipped to the region [low, high] (x, y; broadcastable to [N, 2]) ->
    (clipped [N, 4], keep [N]): a box is kept when at least `min_visible` of its area is inside
    and both clipped sides are >= 2 px."""
    area = (moved[:, 2:] - moved[:, :2]).prod(1)
    clipped = torch.cat([torch.minimum(torch.maximum(moved[:, :2], low), high),
                         torch.minimum(torch.maximum(moved[:, 2:], low), high)], 1)
    wh = clipped[:, 2:] - clipped[:, :2]
    keep = (wh.prod(1) >= min_visible * area) & (wh.min(1).values >= 2)
    return clipped, keep


def mosaic(images: torch.Tensor, targets: list[Target], sources: torch.Tensor, centres: torch.Tensor,
           min_visible: float) -> tuple[torch.Tensor, list[Target]]:
    """2x2 mosaics of batch images (YOLOv4's mosaic, at the input size instead of twice it).

    Output m tiles the image plane around centres[m] = (cx, cy) (integer pixels, 0 < cx < W,
    0 < cy < H) into quadrants q = top-left, top-right, bottom-left, bottom-right, filled from
    images[sources[m, q]]. Each source is resized uniformly (bilinear; rounded up to whole pixels)
    to the smallest size covering its quadrant and keeps the corner that touches the centre; the
    overhang on the outer side is cut. Boxes take the same map, are clipped to their quadrant and
    dropped by the `min_visible` rule of `augment_batch`.

    images [B, 3, H, W]; sources int64 [M, 4] batch indices; centres int64 [M, 2] (CPU) ->
    (images [M, 3, H, W], M targets on the CPU).
    """
    _, _, h, w = images.shape
    device, dtype = images.device, images.dtype
    cx, cy = centres[:, 0], centres[:, 1]  # [M]
    x = torch.arange(w, device=device)
    y = torch.arange(h, device=device)
    out = images.new_zeros(len(sources), *images.shape[1:])
    quadrant_boxes, quadrant_labels = [], []
    for q in range(4):
        right, bottom = q % 2 == 1, q >= 2
        x0, x1 = (cx, torch.full_like(cx, w)) if right else (torch.zeros_like(cx), cx)
        y0, y1 = (cy, torch.full_like(cy, h)) if bottom else (torch.zeros_like(cy), cy)
        qw, qh = x1 - x0, y1 - y0
        # Cover size: the side whose ratio to the image is larger fits exactly, the other is
        # rounded up (ceil division), so the resized source always covers the quadrant.
        wide = qw * h >= qh * w
        sw = torch.where(wide, qw, -(-qh * w // h))
        sh = torch.where(wide, -(-qw * h // w), qh)
        ox = x0 if right else cx - sw  # left / top edge of the resized source, in output pixels
        oy = y0 if bottom else cy - sh
        # One host-to-device copy of the quadrant's numbers, each column [M, 1].
        dox, doy, dsw, dsh, dx0, dx1, dy0, dy1 = torch.stack(
            [ox, oy, sw, sh, x0, x1, y0, y1], 1).to(device)[:, :, None].unbind(1)
        # Output pixel centre p maps to the source's normalised coordinate 2 (p - o) / s - 1.
        gx = (2 * (x + 0.5 - dox) / dsw - 1).to(dtype)  # [M, W]
        gy = (2 * (y + 0.5 - doy) / dsh - 1).to(dtype)  # [M, H]
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # [M, H, W, 2]
        sampled = F.grid_sample(images[sources[:, q].to(device)], grid, mode="bilinear", padding_mode="border",
                                align_corners=False)
        inside = ((x >= dx0) & (x < dx1))[:, None, :] & ((y >= dy0) & (y < dy1))[:, :, None]  # [M, H, W]
        out = torch.where(inside[:, None], sampled, out)

        picked = [targets[j] for j in sources[:, q].tolist()]
        counts = [len(t["boxes"]) for t in picked]
        boxes = torch.cat([t["boxes"].cpu().float().reshape(-1, 4) for t in picked])  # [N, 4]
        labels = torch.cat([t["labels"].cpu().reshape(-1) for t in picked])  # [N]
        # Per-source values [M, 2] repeated once per box -> [N, 2].
        scale, offset, low, high = (torch.stack(pair, 1).float().repeat_interleave(torch.tensor(counts), 0)
                                    for pair in ((sw / w, sh / h), (ox, oy), (x0, y0), (x1, y1)))
        moved = boxes * scale.repeat(1, 2) + offset.repeat(1, 2)
        clipped, keep = _clip_boxes(moved, low, high, min_visible)
        quadrant_boxes.append([c[k] for c, k in zip(clipped.split(counts), keep.split(counts))])
        quadrant_labels.append([lab[k] for lab, k in zip(labels.split(counts), keep.split(counts))])
    new_targets = [{"boxes": torch.cat([qb[m] for qb in quadrant_boxes]),
                    "labels": torch.cat([ql[m] for ql in quadrant_labels])} for m in range(len(sources))]
    return out, new_targets


def _random_mosaic(images: torch.Tensor, targets: list[Target], p: float,
                   min_visible: float, gen: torch.Generator) -> tuple[torch.Tensor, list[Target]]:
    """Replace each image, with probability p, by a mosaic of itself and three other batch images
    (distinct when B >= 4), itself in a random quadrant, around a random centre."""
    b, _, h, w = images.shape
    chosen = torch.rand(b, generator=gen) < p
    order = torch.randperm(b, generator=gen)
    own = torch.randint(4, (b,), generator=gen)  # the quadrant an image keeps for itself
    frac = torch.rand(b, 2, generator=gen) * (MOSAIC_CENTRE[1] - MOSAIC_CENTRE[0]) + MOSAIC_CENTRE[0]
    centres = torch.stack([(frac[:, 0] * w).round().clamp(1, w - 1),
                           (frac[:, 1] * h).round().clamp(1, h - 1)], 1).long()  # [B, 2] (cx, cy)
    # Image i sits at position pos[i] of a random order; quadrant q takes the image
    # (q - own[i]) mod 4 places further along it, so quadrant own[i] is image i itself.
    pos = torch.argsort(order)
    step = (torch.arange(4)[None] - own[:, None]) % 4  # [B, 4]
    sources = order[(pos[:, None] + step) % b]
    idx = chosen.nonzero().squeeze(1)
    if len(idx) == 0:
        return images, targets
    tiled, tiled_targets = mosaic(images, targets, sources[idx], centres[idx], min_visible)
    targets = list(targets)
    for k, i in enumerate(idx.tolist()):
        targets[i] = tiled_targets[k]
    return images.index_copy(0, idx.to(images.device), tiled), targets


def augment_batch(images: torch.Tensor, targets: list[Target], cfg: AugmentConfig,
                  gen: torch.Generator) -> tuple[torch.Tensor, list[Target]]:
    """images [B, 3, H, W] in [0, 1] -> augmented images and targets (new tensors).

    Mosaic (with probability `cfg.mosaic_p` per image) comes first; flip, scale/translate and
    colour then apply to the mosaic as to any image. With `mosaic_p = 0` no random number is drawn
    for it, so the rest of the augmentation is unchanged for a given generator state.
    """
    b, _, h, w = images.shape
    device = images.device
    if cfg.mosaic_p > 0:
        images, targets = _random_mosaic(images, targets, cfg.mosaic_p, cfg.min_visible, gen)
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
        clipped, keep = _clip_boxes(moved, torch.zeros(2, device=device), size[:2], cfg.min_visible)
        new_targets.append({"boxes": clipped[keep], "labels": t["labels"].to(device)[keep]})
    return out, new_targets
