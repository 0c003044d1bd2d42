"""Image priors and the feature-distribution loss of DeepInversion / DIODE (METHOD.md section 1).

All functions return unweighted scalar terms; the synthesizer weights them in one place.
"""

from __future__ import annotations

from typing import Iterator

import torch


BN_EPS = 1e-5  # in the normalised form's denominators (BatchNorm's default eps)


class BNLoss:
    """The feature-distribution term for a fixed set of BN layers (see `bn_loss` for the formula).

    Built once per stage: the running statistics, the layer of each channel and the per-layer
    scales are concatenated and computed here, so each iteration costs a dozen operations on the
    concatenated batch statistics, whatever the number of layers (`BNStatsRecorder.recorded_flat`
    gives them concatenated: no per-layer split and re-concatenation, forward or backward).
    """

    def __init__(self, running: list[tuple[torch.Tensor, torch.Tensor]], p: float = 2.0, mean_weight: float = 1.0,
                 var_weight: float = 1.0, layer_weights: list[float] | None = None, normalize: bool = False) -> None:
        device = running[0][0].device
        self.p = p
        self.sizes = [m.numel() for m, _ in running]
        counts = torch.tensor(self.sizes)
        layers = len(running)
        # Means and variances are one vector [means; variances] against [running means; running
        # variances], their norms one segment sum over 2 L segments (variances' layers offset by L).
        layer = torch.repeat_interleave(torch.arange(layers), counts)
        self.segment = torch.cat([layer, layer + layers]).to(device)
        running_mean = torch.cat([m.float().reshape(-1) for m, _ in running])
        running_var = torch.cat([v.float().reshape(-1) for _, v in running])
        self.running = torch.cat([running_mean, running_var])
        self.weights = None if layer_weights is None else \
            torch.as_tensor(layer_weights, dtype=torch.float32).to(device)
        # Each segment's norm is multiplied by its factor: mean_weight / sqrt(s_l) for the means,
        # var_weight / s_l for the variances (s_l = 1 without `normalize`).
        scale = torch.ones(layers, device=device)
        if normalize:
            per_layer = torch.zeros(layers, device=device).index_add_(0, layer.to(device), running_var)
            scale = per_layer / counts.to(device) + BN_EPS
        self.factors = torch.cat([mean_weight / scale.sqrt(), var_weight / scale])

    def per_layer(self, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
        """Unweighted term of each layer [L], from the layers' concatenated batch means and variances."""
        diff = torch.cat([means.float(), variances.float()]) - self.running
        powered = diff * diff if self.p == 2 else diff.abs().pow(self.p)
        sums = torch.zeros(len(self.factors), device=diff.device, dtype=powered.dtype).index_add_(0, self.segment, powered)
        # An exact match is 0 with gradient 0 (not 0 * inf from the root at 0).
        norms = torch.where(sums > 0, sums.clamp_min(1e-30).pow(1.0 / self.p), 0.0) * self.factors
        layers = len(self.sizes)
        return norms[:layers] + norms[layers:]

    def __call__(self, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
        per_layer = self.per_layer(means, variances)
        return per_layer.sum() if self.weights is None else (self.weights * per_layer).sum()


def bn_loss(recorded: list[tuple[torch.Tensor, torch.Tensor]], running: list[tuple[torch.Tensor, torch.Tensor]],
            p: float = 2.0, mean_weight: float = 1.0, var_weight: float = 1.0,
            layer_weights: list[float] | None = None, normalize: bool = False) -> torch.Tensor:
    """Sum over layers l of w_l * (mean_weight * ||mu_l - rm_l||_p + var_weight * ||var_l - rv_l||_p).

    With `normalize` the differences are in units of the layer's typical running variance
    s_l = mean over channels of rv_l (+ eps): ||mu_l - rm_l||_p / sqrt(s_l) and ||var_l - rv_l||_p / s_l,
    so a layer's term does not scale with the size of its activations and one weight suits
    different teachers. One scale per layer, not per channel: pretrained backbones carry dead
    channels (running variance ~1e-45) that a per-channel division would blow up.

    Norms are not raised to the power p (the paper's formulation); mu/var are the batch statistics
    of each BN layer's input, rm/rv its running statistics. Computed for all layers at once (one
    concatenation and a per-layer segment sum, `BNLoss`), not in a Python loop over layers: a few
    kernel launches instead of several per layer, which is what bounds small teachers on a GPU.
    """
    loss = BNLoss(running, p, mean_weight, var_weight, layer_weights, normalize)
    return loss(torch.cat([m.reshape(-1) for m, _ in recorded]), torch.cat([v.reshape(-1) for _, v in recorded]))


# (first, second) index of each neighbour pair over the last two dims: right, down, both diagonals.
_PAIRS = (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
          ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
          ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))),
          ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))))


def _neighbour_differences(images: torch.Tensor) -> Iterator[torch.Tensor]:
    """Differences to the right, down, and along both diagonals of images [B, C, H, W], in
    `_PAIRS` order, one at a time (each built when the next is asked for)."""
    return (images[..., a[0], a[1]] - images[..., b[0], b[1]] for a, b in _PAIRS)


def _tv_l1_grad(images: torch.Tensor) -> torch.Tensor:
    """The gradient G of tv_l1 at `images` (in fp32 at least), accumulated one direction at a
    time while its signs are in cache (the first direction writes G: no zero fill; a single
    direction's differences alive at a time)."""
    dtype = torch.promote_types(images.dtype, torch.float32)
    grad = torch.empty(images.shape, dtype=dtype, device=images.device)
    grad[..., :, -1].zero_()  # the first direction (to the right) writes every other column
    for k, ((a, b), diff) in enumerate(zip(_PAIRS, _neighbour_differences(images))):
        if diff.numel() == 0:  # an image 1 px wide or high has no pairs in this direction
            continue
        sign, n = diff.sign_(), diff.numel()
        if k == 0:
            torch.mul(sign, 1.0 / n, out=grad[..., a[0], a[1]])
        else:
            grad[..., a[0], a[1]].add_(sign, alpha=1.0 / n)
        grad[..., b[0], b[1]].sub_(sign, alpha=1.0 / n)
    return grad


class _TVL1(torch.autograd.Function):
    """tv_l1 with its gradient written out: sum over directions of mean |x_a - x_b|, gradient
    G = sign(x_a - x_b) / n added at a and subtracted at b. Same values and gradients as autograd
    through slicing and abs (which would build and add eight zero-padded image-size tensors in
    backward). G is built in the forward (`_tv_l1_grad`), and the value is the dot product x . G
    (the sum over pairs of sign(x_a - x_b) (x_a - x_b) / n, regrouped by pixel: no abs and sum
    per direction); backward scales G in place (it is not needed again: no new image-size
    tensor), and a second backward through the same graph (``retain_graph``) rebuilds G from the
    saved images. Forward + backward 3.1-3.6x faster than autograd and 25-30 % faster than
    keeping the four directions' signs for backward (as before), on the 2-core CPU
    (benchmarks/loop_parts.py, results/perf.md)."""

    @staticmethod
    def forward(ctx, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = _tv_l1_grad(images)
        ctx.save_for_backward(images)
        ctx.grad = grad  # not a saved tensor: backward scales it in place
        # (a copy only for a non-contiguous or low-precision image)
        return torch.dot(images.reshape(-1).to(grad.dtype), grad.view(-1))

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (images,) = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward: G was scaled by the first
            grad = _tv_l1_grad(images)
        return grad.mul_(grad_total.to(grad.dtype)).to(images.dtype)


def tv_l1(images: torch.Tensor) -> torch.Tensor:
    """Sum over the 4 directions of the mean absolute neighbour difference (over batch, channels, pixels)."""
    return _TVL1.apply(images)


def tv_l2(images: torch.Tensor) -> torch.Tensor:
    """Sum over the 4 directions of the L2 norm of each image's neighbour differences, averaged over the batch."""
    return sum(torch.linalg.vector_norm(d.flatten(1), dim=1).mean() for d in _neighbour_differences(images))


def total_variation(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tv_l1, tv_l2) of images [B, C, H, W] (see `tv_l1` and `tv_l2`)."""
    return tv_l1(images), tv_l2(images)


def image_l2(images: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's L2 norm (DeepInversion's image prior; DIODE uses weight 0)."""
    return torch.linalg.vector_norm(images.flatten(1), dim=1).mean()
