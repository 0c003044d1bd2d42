"""Image priors and the feature-distribution loss of DeepInversion / DIODE (METHOD.md section 1).

All functions return unweighted scalar terms; the synthesizer weights them in one place.
"""

from __future__ import annotations

import torch


def bn_loss(recorded: list[tuple[torch.Tensor, torch.Tensor]], running: list[tuple[torch.Tensor, torch.Tensor]],
            p: float = 2.0, mean_weight: float = 1.0, var_weight: float = 1.0,
            layer_weights: list[float] | None = None) -> torch.Tensor:
    """Sum over layers l of w_l * (mean_weight * ||mu_l - rm_l||_p + var_weight * ||var_l - rv_l||_p).

    Norms are not raised to the power p (the paper's formulation); mu/var are the batch statistics
    of each BN layer's input, rm/rv its running statistics.
    """
    weights = layer_weights if layer_weights is not None else [1.0] * len(recorded)
    total = recorded[0][0].new_zeros(())
    for w, (mu, var), (rm, rv) in zip(weights, recorded, running):
        total = total + w * (mean_weight * torch.linalg.vector_norm(mu - rm, p)
                             + var_weight * torch.linalg.vector_norm(var - rv, p))
    return total


def _neighbour_differences(images: torch.Tensor) -> list[torch.Tensor]:
    """Differences to the right, down, and along both diagonals of images [B, C, H, W]."""
    return [images[..., :, :-1] - images[..., :, 1:],
            images[..., :-1, :] - images[..., 1:, :],
            images[..., 1:, :-1] - images[..., :-1, 1:],
            images[..., :-1, :-1] - images[..., 1:, 1:]]


def total_variation(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tv_l1, tv_l2) of images [B, C, H, W].

    tv_l1: sum over the 4 directions of the mean absolute difference (over batch, channels, pixels).
    tv_l2: sum over the 4 directions of the L2 norm of the differences of each image, averaged over
    the batch.
    """
    diffs = _neighbour_differences(images)
    tv_l1 = sum(d.abs().mean() for d in diffs)
    tv_l2 = sum(torch.linalg.vector_norm(d.flatten(1), dim=1).mean() for d in diffs)
    return tv_l1, tv_l2


def image_l2(images: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's L2 norm (DeepInversion's image prior; DIODE uses weight 0)."""
    return torch.linalg.vector_norm(images.flatten(1), dim=1).mean()
