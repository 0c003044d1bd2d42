"""Record the per-channel statistics of the inputs of a detector's BN layers.

Layers are found by the presence of running statistics (so frozen BN counts) and selected by name
pattern or count, never by layer index into a hard-coded list. Statistics are recorded only
inside `recording()`, so the teacher's ordinary forwards (NMS, evaluation) pay nothing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from diode.errors import DiodeError


def select_bn_layers(layers: list[tuple[str, nn.Module]], selection: str | int | None) -> list[tuple[str, nn.Module]]:
    """All layers (None / "all"), the first `n` (int), or those matching comma-separated glob patterns."""
    if selection is None or selection == "all":
        chosen = layers
    elif isinstance(selection, int):
        if selection < 1:
            raise DiodeError(f"bn.layers: a count must be >= 1, got {selection}")
        chosen = layers[:selection]
    else:
        patterns = [p.strip() for p in str(selection).split(",") if p.strip()]
        chosen = [(n, m) for n, m in layers if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise DiodeError(f"bn.layers {selection!r} selects no BN layer (the detector has {len(layers)})")
    return chosen


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _uses_batch_norm_kernels(x: torch.Tensor) -> bool:
    """Per-channel affine maps of x go through eval-mode batch_norm (an NCHW CPU tensor: several
    times faster there than broadcast mul / addcmul) rather than broadcasting (channels_last on
    the CPU, where broadcasting is 1.4x faster over the bundled teacher's layers,
    benchmarks/bn_moments.py; any GPU)."""
    return x.device.type == "cpu" and x.is_contiguous()


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=dtype, device=device)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum of x and sum of x^2 over (B, H, W) of x [B, C, H, W]: unnormalised, so the
    gradient of the pair is just g_s + 2 g_h x, and the division by the count is done once for
    all layers (`_mean_var`). For NCHW each is one pass over x: the sum of squares as a squared L2
    norm (no x * x temporary; half the time of multiply-then-sum on the CPU,
    benchmarks/bn_moments.py), over H W then a small sum over B. A channels_last activation is a
    [C, B H W] matrix whose columns are pixels: on the CPU its sums are matrix-vector products
    with a vector of ones (BLAS; half the time of reducing it and a quarter of reducing the
    strided [B, C, H W] view, which vectorise poorly over a few dozen channels,
    benchmarks/bn_moments.py); elsewhere it is reduced."""
    b, c = x.shape[:2]
    if _is_channels_last(x):
        pixels = x.transpose(0, 1).reshape(c, -1)  # a view: [C, B H W] with the channels contiguous
        # Not where matrix products may run in reduced precision (a GPU's TF32, or a lowered
        # float32 matmul precision): there the pixels are reduced.
        if x.device.type == "cpu" and torch.get_float32_matmul_precision() == "highest":
            ones = _ones(pixels.shape[1], x.dtype, x.device)
            return torch.mv(pixels, ones), torch.mv(pixels.square(), ones)
        return pixels.sum(1), torch.linalg.vector_norm(pixels, 2, 1).square_()
    flat = x.view(b, c, -1) if x.is_contiguous() else x.reshape(b, c, -1)
    return flat.sum((0, 2)), torch.linalg.vector_norm(flat, 2, 2).square_().sum(0)


_NO_EPS = 1e-30  # 1 + 1e-30 == 1 in fp32 and fp64: the division by sqrt(var + eps) is exact


class _Channel(NamedTuple):
    """Per-channel constants of a BN layer acting as a fixed affine map y = x * scale + shift
    (`_frozen_affine`), as vectors and as [1, C, 1, 1] views, and those the batch_norm path of
    `_affine` needs. Built by `_channel`."""
    scale: torch.Tensor
    shift: torch.Tensor
    scale4d: torch.Tensor
    shift4d: torch.Tensor
    zeros: torch.Tensor
    ones: torch.Tensor
    quarters: torch.Tensor  # 0.25: batch_norm with this variance multiplies by 2


def _constants(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros_like(like), torch.ones_like(like), torch.full_like(like, 0.25)


def _channel(scale: torch.Tensor, shift: torch.Tensor) -> _Channel:
    return _Channel(scale, shift, scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1), *_constants(scale))


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
            constants: tuple[torch.Tensor, ...], double: bool = False) -> torch.Tensor:
    """x * scale + shift per channel in one pass (x * 2 scale + shift with `double`): through
    eval-mode batch_norm with mean 0, var 1 (0.25 to double) and an eps that vanishes next to 1 in
    floating point (batch_norm wants eps > 0) where `_uses_batch_norm_kernels`, else one
    broadcast multiply-add. `constants` = (zeros, ones, quarters)."""
    if not _uses_batch_norm_kernels(x):
        view = (1, -1) + (1,) * (x.dim() - 2)
        if shift is None:
            return x * (scale.view(view) * 2 if double else scale.view(view))
        return torch.addcmul(shift.view(view), x, scale.view(view), value=2 if double else 1)
    zeros, ones, quarters = constants
    return torch.batch_norm(x, scale, shift, zeros, quarters if double else ones, False, 0.0, _NO_EPS, False)


def _moments_grad(x: torch.Tensor, g_s: torch.Tensor | None, g_h: torch.Tensor | None,
                  constants: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """d(sum x, sum x^2)/dx contracted with (g_s, g_h): g_s + 2 g_h x, one pass."""
    like = g_s if g_s is not None else g_h
    constants = constants or _constants(like)
    return _affine(x, constants[0] if g_h is None else g_h, constants[0] if g_s is None else g_s, constants,
                   double=True)


class _ChannelMoments(torch.autograd.Function):
    """Per-channel (sum x, sum x^2) with the gradient written out (`_moments_grad`, one pass).
    Several times faster on the CPU than ``torch.var_mean`` forward + backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.save_for_backward(x)
        return _moments(x)

    @staticmethod
    def backward(ctx, g_s: torch.Tensor, g_h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return _moments_grad(x, g_s, g_h)


class _FrozenBNWithMoments(torch.autograd.Function):
    """A frozen BN layer (y = x * scale + shift per channel) and the moments of its input in one
    function: forward and backward each make one pass over x fewer than the layer plus
    `_ChannelMoments` (whose gradient autograd would add to the layer's in a third pass), and
    only a handful of operations per layer (the mean/variance arithmetic is done once for all
    layers, in `BNStatsRecorder.recorded_flat`). `channel` (`_Channel`) holds constants, passed
    as one argument and kept on `ctx` (not saved tensors), which keeps the per-call cost of the
    function itself low (it runs once per BN layer); the broadcasting path uses its
    [1, C, 1, 1] views directly (about 4 us a layer fewer than through `_affine` on the CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, channel: _Channel):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.channel = channel
        if _uses_batch_norm_kernels(x):
            y = _affine(x, channel.scale, channel.shift, channel[4:])
        else:
            y = torch.addcmul(channel.shift4d, x, channel.scale4d)
        return (y,) + _moments(x)

    @staticmethod
    def backward(ctx, g_y: torch.Tensor | None, g_s: torch.Tensor | None,
                 g_h: torch.Tensor | None):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        channel = ctx.channel
        if g_s is None and g_h is None:
            return _affine(g_y, channel.scale, None, channel[4:]), None
        if g_s is None or g_h is None or _uses_batch_norm_kernels(x):
            grad = _moments_grad(x, g_s, g_h, channel[4:])
        else:  # g_s + 2 g_h x, broadcast
            grad = torch.addcmul(g_s.view(1, -1, 1, 1), x, g_h.view(1, -1, 1, 1), value=2)
        if g_y is not None:  # in place: a second activation-size temporary costs more than the add
            grad = grad.addcmul_(g_y, channel.scale4d)
        return grad, None


def _mean_var(s: torch.Tensor, h: torch.Tensor, inv_n: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) from the sums of `_moments` and 1 / count (per channel or one number).
    BN inputs are O(1) activations, so the cancellation in E[x^2] - E[x]^2 is negligible in fp32."""
    mean = s * inv_n
    return mean, (h * inv_n - mean * mean).clamp_(min=0)


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_ChannelMoments` (sums) of x in fp32 at least (also under bf16 autocast)."""
    return _ChannelMoments.apply(x if x.dtype in (torch.float32, torch.float64) else x.float())


def channel_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (B, H, W) of x [B, C, H, W], in fp32 (also under
    bf16 autocast), differentiable with respect to x."""
    return _mean_var(*_channel_moments(x), 1.0 / (x.numel() // x.shape[1]))


def _frozen_affine(module: nn.Module) -> _Channel | None:
    """The `_Channel` constants of a BN layer that acts as a fixed per-channel affine map right
    now (eval-mode BatchNorm2d with running statistics, or FrozenBatchNorm2d, no parameter requiring
    a gradient), else None."""
    if isinstance(module, nn.BatchNorm2d):
        if module.training or module.running_mean is None:
            return None
    elif not isinstance(module, FrozenBatchNorm2d):
        return None
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        return None
    scale = torch.rsqrt(module.running_var.float() + module.eps)
    shift = -module.running_mean.float() * scale
    if module.weight is not None:
        scale = scale * module.weight.float()
        shift = shift * module.weight.float()
    if module.bias is not None:
        shift = shift + module.bias.float()
    return _channel(scale, shift)


class BNStatsRecorder:
    """Records (mean, biased var) over (B, H, W) of each selected BN layer's input.

    Inside `recording()` each selected layer's `forward` is replaced: a frozen layer on an fp32
    input runs as `_FrozenBNWithMoments` (the layer and its input's moments fused); any other
    layer (in training mode, bf16 input, another BN type, an instance-level `forward`) records
    the moments of its input and runs its own forward. The replacement of each layer is built
    once and reused while the layer's state (`_state`) is unchanged. Under `torch.compile` the
    moments are plain reductions, for the compiler to fuse with the layer. Outside `recording()`
    the layers are untouched and cost nothing extra.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.names = [n for n, _ in layers]
        self.modules = [m for _, m in layers]
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)  # `_moments` sums
        self.counts: list[int] = [0] * len(layers)  # elements per channel behind each layer's sums
        self._inv_counts: dict[tuple, torch.Tensor] = {}  # (device, counts) -> 1 / count per channel
        self._removed = False
        self._recorded: tuple[torch.Tensor, torch.Tensor] | None = None  # recorded_flat's result
        # index -> (state key, forward): the wrapped forward of each layer, rebuilt only when the
        # layer's mode, buffers or parameters (or an instance-level forward) change.
        self._forwards: dict[int, tuple[tuple, Callable]] = {}

    @staticmethod
    def _state(module: nn.Module) -> tuple:
        """What the fused path depends on, read without nn.Module's attribute lookup (this runs
        for every layer at every iteration): mode, instance forward, and each buffer's and
        parameter's identity, version and requires_grad."""
        d = module.__dict__
        tensors = list(d["_buffers"].values()) + list(d["_parameters"].values())
        return (d["training"], d.get("forward"), *[(t.data_ptr(), t._version, t.requires_grad)
                                                   for t in tensors if t is not None])

    def _forward_of(self, index: int, module: nn.Module) -> Callable:
        state = self._state(module)
        cached = self._forwards.get(index)
        if cached is None or cached[0] != state:
            cached = self._forwards[index] = (state, self._make_forward(index, module, module.forward))
        return cached[1]

    def _make_forward(self, index: int, module: nn.Module, original):
        # Fused only for the layer's own forward: an instance-level one (someone else's) runs as is.
        affine = None if "forward" in module.__dict__ else _frozen_affine(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            self.counts[index] = x.numel() // x.shape[1]
            if torch.compiler.is_compiling():  # plain operations: the compiler fuses them with the layer
                xf = x.float()
                self.stats[index] = (xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)))
                return original(x)
            if affine is not None and x.dtype == torch.float32:
                y, s, h = _FrozenBNWithMoments.apply(x, affine)
                self.stats[index] = (s, h)
                return y
            self.stats[index] = _channel_moments(x)
            return original(x)
        return forward

    def running(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layers' running (mean, var): the teacher's record of its training data."""
        return [(m.running_mean.float(), m.running_var.float()) for m in self.modules]

    @contextlib.contextmanager
    def recording(self) -> Iterator["BNStatsRecorder"]:
        self.stats = [None] * len(self.modules)
        self._recorded = None
        if self._removed:
            yield self
            return
        # Set and restored through the instance dict: nn.Module's __setattr__ / __delattr__ cost
        # more than the rest of this per layer.
        dicts = [m.__dict__ for m in self.modules]
        saved = [d.get("forward") for d in dicts]
        for i, (m, d) in enumerate(zip(self.modules, dicts)):
            d["forward"] = self._forward_of(i, m)
        try:
            yield self
        finally:
            for d, previous in zip(dicts, saved):
                if previous is None:
                    del d["forward"]
                else:
                    d["forward"] = previous

    def recorded_flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, biased variances) of all layers' inputs in the last `recording()` block,
        concatenated in layer order ([sum of the layers' channels] each), computed for all layers
        at once from the recorded moments."""
        missing = [n for n, s in zip(self.names, self.stats) if s is None]
        if missing:
            raise RuntimeError(f"BN layers not reached by the forward pass: {missing[:3]}")
        if self._recorded is None:
            sums = torch.cat([s for s, _ in self.stats])  # type: ignore[misc]
            sizes = [s.numel() for s, _ in self.stats]  # type: ignore[misc]
            key = (sums.device, tuple(self.counts), tuple(sizes))
            inv_n = self._inv_counts.get(key)
            if inv_n is None:  # built once per input size, not every iteration
                inv_n = self._inv_counts[key] = torch.cat(
                    [torch.full((c,), 1.0 / n) for c, n in zip(sizes, self.counts)]).to(sums.device, non_blocking=True)
            self._recorded = _mean_var(sums, torch.cat([h for _, h in self.stats]), inv_n)  # type: ignore[misc]
        return self._recorded

    def recorded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, biased var) of each layer's input in the last `recording()` block (views of
        `recorded_flat`)."""
        means, variances = self.recorded_flat()
        sizes = [s.numel() for s, _ in self.stats]  # type: ignore[misc]
        return list(zip(means.split(sizes), variances.split(sizes)))

    def remove(self) -> None:
        """Stop recording for good (later `recording()` blocks leave the layers alone)."""
        self._removed = True
