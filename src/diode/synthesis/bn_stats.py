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
from diode.synthesis.bn_fold import Chain, Fold, chains, fold, global_hooks, hooked


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


_WIDE_COLUMNS = 128  # row width for the CPU statistics kernel (slow below 32 columns here; `_moments`)


def _groups(x: torch.Tensor) -> int:
    """How `_moments` summarises x: 0 for per-channel sums; k >= 1 for (mean, var) of k column
    groups per channel (a float channels_last activation on the CPU, `_moments`)."""
    if x.device.type != "cpu" or not _is_channels_last(x) or x.dtype not in (torch.float32, torch.float64):
        return 0
    c = x.shape[1]
    n = x.numel() // c
    k = 1
    while k * c < _WIDE_COLUMNS and n % (2 * k) == 0:
        k *= 2
    return k


def _wide(x: torch.Tensor, k: int) -> torch.Tensor:
    """A channels_last x [B, C, H, W] as the [B H W / k, k C] matrix whose rows are k neighbouring
    pixels side by side (a view): column j C + c holds channel c of the pixels j, j + k, j + 2k..."""
    kc = k * x.shape[1]
    return x.as_strided((x.numel() // kc, kc), (kc, 1))


def _moments(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of x [B, C, H, W] over (B, H, W), in the form `_groups(x)` = k chose, and what
    their gradient (`_moments_grad`) needs: x, or its wide view for k >= 1.

    k = 0: the per-channel sum of x and of x^2 [C], unnormalised, so their gradient is just
    g_s + 2 g_h x and the division by the count is done once for all layers (`_Layout`); each
    one pass over x (the squares as a squared L2 norm: no x * x temporary, half the time of
    multiply-then-sum on the CPU), over H W then a small sum over B (NCHW), or over the pixels
    (channels_last, any other device).

    k >= 1 (a channels_last activation on the CPU): the (mean, biased variance) [k C] of each
    column of `_wide(x, k)`, from PyTorch's batch-statistics kernel (the one training-mode BN
    uses; two passes, both moments, vectorised over a row) on that matrix, whose rows are at
    least 128 wide where the pixel count allows: over the bundled teacher's 58 BN inputs at batch
    32 that takes half the time of matrix-vector products of the [C, B H W] view with a vector of
    ones and its squares (the session-8 way), whereas on rows of the 12-48 channels alone it takes
    twice as long (benchmarks/bn_moments.py). Each channel's k columns are combined by `_Layout`."""
    if k:
        wide = _wide(x, k)
        rows, kc = wide.shape  # the kernel reads [1, k C, rows, 1] in channels_last: the same memory
        return (*torch.batch_norm_update_stats(wide.as_strided((1, kc, rows, 1), (kc * rows, 1, kc, 1)), None,
                                               None, 0.0), wide)
    b, c = x.shape[:2]
    if _is_channels_last(x):
        pixels = x.transpose(0, 1).reshape(c, -1)  # a view: [C, B H W] with the channels contiguous
        return pixels.sum(1), torch.linalg.vector_norm(pixels, 2, 1).square_(), x
    flat = x.view(b, c, -1) if x.is_contiguous() else x.reshape(b, c, -1)
    return flat.sum((0, 2)), torch.linalg.vector_norm(flat, 2, 2).square_().sum(0), x


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


@functools.lru_cache(maxsize=256)
def _reciprocals(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / n and 2 / n as 0-dim tensors: multiplying a small tensor by one takes half the time of
    multiplying it by a Python number (which PyTorch first converts to a tensor) on this CPU."""
    return torch.tensor(1.0 / n, dtype=dtype, device=device), torch.tensor(2.0 / n, dtype=dtype, device=device)


def _moments_grad(saved: torch.Tensor, k: int, mean: torch.Tensor, g1: torch.Tensor | None,
                  g2: torch.Tensor | None, shape: torch.Size, constants: tuple[torch.Tensor, ...] | None = None
                  ) -> torch.Tensor:
    """The gradient of `_moments(x, k)` (x of `shape`, `saved` its third output, `mean` its first)
    contracted with (g1, g2), in one pass: g_s + 2 g_h x for k = 0; for k >= 1, per column of
    the wide view of M rows, g_mean / M + 2 g_var (x - mean) / M, as a tensor of x's shape and
    format."""
    if not k:
        like = g1 if g1 is not None else g2
        constants = constants or _constants(like)
        return _affine(saved, constants[0] if g2 is None else g2, constants[0] if g1 is None else g1, constants,
                       double=True)
    rows = saved.shape[0]
    if g1 is None or g2 is None:
        g1 = torch.zeros_like(mean) if g1 is None else g1
        g2 = torch.zeros_like(mean) if g2 is None else g2
    inverse, double_inverse = _reciprocals(rows, mean.dtype, mean.device)
    slope = g2 * double_inverse  # (g1 / M - slope mean) + slope x
    grad = torch.addcmul(torch.addcmul(g1 * inverse, mean, slope, value=-1), saved, slope)
    b, c, h, w = shape
    return grad.as_strided((b, c, h, w), (h * w * c, 1, w * c, c))  # back to channels_last [B, C, H, W]


class _ChannelMoments(torch.autograd.Function):
    """`_moments(x, k)` with its gradient written out (`_moments_grad`, one pass). Several times
    faster on the CPU than ``torch.var_mean`` forward + backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        first, second, saved = _moments(x, k)
        ctx.save_for_backward(saved, first)
        ctx.k, ctx.shape = k, x.shape
        return first, second

    @staticmethod
    def backward(ctx, g1: torch.Tensor, g2: torch.Tensor):  # type: ignore[override]
        saved, first = ctx.saved_tensors
        return _moments_grad(saved, ctx.k, first, g1, g2, ctx.shape), None


class _FrozenBNWithMoments(torch.autograd.Function):
    """A frozen BN layer (y = x * scale + shift per channel) and `_moments(x, k)` of its input in
    one function: forward and backward each make one pass over x fewer than the layer plus
    `_ChannelMoments` (whose gradient autograd would add to the layer's in a third pass), and
    only a handful of operations per layer (the mean/variance arithmetic is done once for all
    layers, by `_Layout`). `channel` (`_Channel`) holds constants, passed as one argument and
    kept on `ctx` (not saved tensors), which keeps the per-call cost of the function itself low
    (it runs once per BN layer); the broadcasting path uses its [1, C, 1, 1] views directly
    (about 4 us a layer fewer than through `_affine` on the CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, channel: _Channel, k: int):  # type: ignore[override]
        if not k and _uses_batch_norm_kernels(x):  # (k > 0: channels_last, broadcast)
            y = _affine(x, channel.scale, channel.shift, channel[4:])
        else:
            y = torch.addcmul(channel.shift4d, x, channel.scale4d)
        first, second, saved = _moments(x, k)
        ctx.save_for_backward(saved, first)
        ctx.channel, ctx.k, ctx.shape = channel, k, x.shape
        return y, first, second

    @staticmethod
    def backward(ctx, g_y: torch.Tensor | None, g1: torch.Tensor | None,
                 g2: torch.Tensor | None):  # type: ignore[override]
        saved, first = ctx.saved_tensors
        channel = ctx.channel
        if g1 is None and g2 is None:
            return _affine(g_y, channel.scale, None, channel[4:]), None, None
        if ctx.k or g1 is None or g2 is None or _uses_batch_norm_kernels(saved):
            grad = _moments_grad(saved, ctx.k, first, g1, g2, ctx.shape, channel[4:])
        else:  # g_s + 2 g_h x, broadcast
            grad = torch.addcmul(g1.view(1, -1, 1, 1), saved, g2.view(1, -1, 1, 1), value=2)
        if g_y is not None:  # in place: a second activation-size temporary costs more than the add
            grad = grad.addcmul_(g_y, channel.scale4d)
        return grad, None, None


def _mean_var(s: torch.Tensor, h: torch.Tensor, inv_n: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) from the sums of `_moments` and 1 / count (per channel or one number).
    BN inputs are O(1) activations, so the cancellation in E[x^2] - E[x]^2 is negligible in fp32."""
    mean = s * inv_n
    return mean, (h * inv_n - mean * mean).clamp_(min=0)


class _Layout:
    """Per-channel (mean, biased var) of several layers at once from their `_moments`, given
    concatenated in layer order: sums (k = 0) are divided by their count, and the k column
    groups of a channel (k >= 1, equally many values each) are merged, mean of the means and
    mean of (variance + squared deviation of the group's mean). A handful of operations on the
    concatenated vectors, whatever the number of layers; built once per input size."""

    def __init__(self, sizes: list[int], groups: list[int], counts: list[int], device: torch.device) -> None:
        factor, summed, channel, weight = [], [], [], []
        self.channels: list[int] = []  # per layer
        total = 0
        for size, k, n in zip(sizes, groups, counts):
            c = size // k if k else size
            factor += [1.0 if k else 1.0 / n] * size
            summed += [not k] * size
            channel.append(torch.arange(size) % c + total)
            weight += [1.0 / k if k else 1.0] * size
            self.channels.append(c)
            total += c
        self.total = total
        self.all_sums = all(summed)
        self.factor = torch.tensor(factor).to(device, non_blocking=True) if any(summed) else None
        self.summed = torch.tensor(summed).to(device, non_blocking=True) if any(summed) and not self.all_sums else None
        merge = total != len(factor)
        self.channel = torch.cat(channel).to(device, non_blocking=True) if merge else None
        self.weight = torch.tensor(weight).to(device, non_blocking=True) if merge else None

    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.all_sums:
            return _mean_var(first, second, self.factor)
        if self.summed is not None:  # some layers gave sums, others (mean, var)
            mean = first * self.factor
            var = torch.where(self.summed, (second * self.factor - mean * mean).clamp(min=0), second)
        else:
            mean, var = first, second
        if self.channel is None:
            return mean, var
        merged = torch.zeros(self.total, dtype=mean.dtype, device=mean.device).index_add_(
            0, self.channel, mean * self.weight)
        deviation = mean - merged.index_select(0, self.channel)  # (half the time of merged[self.channel])
        merged_var = torch.zeros_like(merged).index_add_(
            0, self.channel, torch.addcmul(var, deviation, deviation) * self.weight)
        return merged, merged_var


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`_ChannelMoments` of x in fp32 at least (also under bf16 autocast), and its k (`_groups`)."""
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    k = _groups(x)
    return (*_ChannelMoments.apply(x, k), k)


def channel_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (B, H, W) of x [B, C, H, W], in fp32 (also under
    bf16 autocast), differentiable with respect to x."""
    first, second, k = _channel_moments(x)
    return _Layout([first.numel()], [k], [x.numel() // x.shape[1]], x.device)(first, second)


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

    Given the network (`root`), a frozen layer that sits between an `nn.Conv2d` and an
    activation module in an `nn.Sequential` (the usual conv-BN-act block) or in one of `blocks`
    (modules whose forward applies the named children in order, as a detector declares them:
    `Detector.sequential_blocks`) is folded into the conv while recording (fp32, no autocast;
    `bn_fold`): the container runs the pair as one convolution with the BN's scale and shift in
    its weight and bias, the moments are taken of its output y = scale * x + shift and taken back
    to x's, (mean_y - shift) / scale and var_y / scale^2, for all layers at once in
    `recorded_flat`, and the activation runs out of place (y is kept for the moments' gradient).
    Same values as unfolded up to rounding; no affine pass over the activation forward or
    backward and one activation-size tensor fewer kept per layer (a synthesis iteration 5-6 %
    shorter and 17 % less peak memory for the bundled teacher at batch 32 on the 2-core CPU,
    results/perf.md session 10). Not folded (`bn_fold.fold`): a conv or BN with hooks, a
    trainable or non-fp32 conv, a channel whose scale is too small to divide by, a Sequential
    subclass with its own forward.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], root: nn.Module | None = None,
                 blocks: list[tuple[nn.Module, tuple[str, ...]]] = ()) -> None:
        self.names = [n for n, _ in layers]
        self.modules = [m for _, m in layers]
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)  # `_moments`
        self.groups: list[int] = [0] * len(layers)  # the k of each layer's `_moments`
        self.counts: list[int] = [0] * len(layers)  # elements per channel behind each layer's statistics
        # the BN map of each layer folded into its conv in the last recording (its moments are of y)
        self.folded: list[_Channel | None] = [None] * len(layers)
        self._chains = chains(root, self.modules, blocks) if root is not None else []
        self._chain_forwards: dict[int, tuple[tuple, Callable | None]] = {}  # id(module) -> (key, forward)
        self._unfold: tuple | None = None  # (folded maps, offset, inverse, inverse^2) of `_unfolding`
        self._layouts: dict[tuple, _Layout] = {}  # (device, counts, sizes, groups) -> its `_Layout`
        self._layout: _Layout | None = None  # that of the last recorded_flat
        self._removed = False
        self._recorded: tuple[torch.Tensor, torch.Tensor] | None = None  # recorded_flat's result
        # index -> (state key, forward, affine map or None): the wrapped forward of each layer,
        # rebuilt only when the layer's mode, buffers or parameters (or an instance-level forward) change.
        self._forwards: dict[int, tuple[tuple, Callable, _Channel | None]] = {}

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
            # Fused only for the layer's own forward: an instance-level one (someone else's) runs as is.
            affine = None if "forward" in module.__dict__ else _frozen_affine(module)
            cached = self._forwards[index] = (state, self._make_forward(index, module.forward, affine), affine)
        return cached[1]

    def _make_forward(self, index: int, original, affine: _Channel | None):
        def forward(x: torch.Tensor) -> torch.Tensor:
            self.counts[index] = x.numel() // x.shape[1]
            self.folded[index] = None  # (run as a layer: moments of its input)
            if torch.compiler.is_compiling():  # plain operations: the compiler fuses them with the layer
                xf = x.float()
                self.stats[index], self.groups[index] = (xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3))), 0
                return original(x)
            if affine is not None and x.dtype == torch.float32:
                k = _groups(x)
                y, first, second = _FrozenBNWithMoments.apply(x, affine, k)
                self.stats[index], self.groups[index] = (first, second), k
                return y
            first, second, self.groups[index] = _channel_moments(x)
            self.stats[index] = (first, second)
            return original(x)
        return forward

    def _chain_forward(self, chain: Chain) -> Callable | None:
        """The folding forward of a `Chain` for its pairs' current states (after
        `_forward_of` for its layers), or None where no pair folds; cached like `_forward_of`."""
        children = chain.children
        key = tuple((self._forwards[i][0], self._state(children[pos]), hooked(children[pos]),
                     hooked(children[pos + 1])) for pos, i in chain.pairs.items())
        cached = self._chain_forwards.get(id(chain.module))
        if cached is None or cached[0] != key:
            folds: list[Fold | None] = [None] * len(children)
            for pos, i in chain.pairs.items():
                folds[pos] = fold(i, children[pos], children[pos + 1], self._forwards[i][2])
            forward = self._make_chain_forward(children, folds) if any(folds) else None
            cached = self._chain_forwards[id(chain.module)] = (key, forward)
        return cached[1]

    def _make_chain_forward(self, children: tuple[nn.Module, ...], folds: list[Fold | None]):
        n = len(children)

        def forward(x: torch.Tensor) -> torch.Tensor:
            pos = 0
            while pos < n:
                pair = folds[pos]
                if (pair is not None and not torch.compiler.is_compiling() and x.dtype == torch.float32
                        and not torch.is_autocast_enabled(x.device.type)):
                    x = self._run_fold(pair, x)
                    pos += 2  # the BN is in the convolution
                else:
                    x = children[pos](x)
                    pos += 1
            return x
        return forward

    def _run_fold(self, pair: Fold, x: torch.Tensor) -> torch.Tensor:
        y = pair.conv._conv_forward(x, pair.weight, pair.bias)
        first, second, k = _channel_moments(y)
        i = pair.index
        self.stats[i], self.groups[i], self.folded[i] = (first, second), k, pair.channel
        self.counts[i] = y.numel() // y.shape[1]
        return y

    def running(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layers' running (mean, var): the teacher's record of its training data."""
        return [(m.running_mean.float(), m.running_var.float()) for m in self.modules]

    @contextlib.contextmanager
    def recording(self) -> Iterator["BNStatsRecorder"]:
        self.stats = [None] * len(self.modules)
        self.folded = [None] * len(self.modules)
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
        folding, inplace = [], []
        # A module given a forward by someone else, or whose children changed, is left alone;
        # with hooks registered for every module nothing folds.
        for chain in () if global_hooks() else self._chains:
            d = chain.module.__dict__
            if "forward" in d or not chain.unchanged():
                continue
            forward = self._chain_forward(chain)
            if forward is not None:
                d["forward"] = forward
                folding.append(d)
                inplace += [a.__dict__ for a in chain.activations if a.__dict__.get("inplace") is True]
        for d in inplace:
            d["inplace"] = False
        try:
            yield self
        finally:
            for d, previous in zip(dicts, saved):
                if previous is None:
                    del d["forward"]
                else:
                    d["forward"] = previous
            for d in folding:
                del d["forward"]
            for d in inplace:
                d["inplace"] = True

    def recorded_flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, biased variances) of all layers' inputs in the last `recording()` block,
        concatenated in layer order ([sum of the layers' channels] each), computed for all layers
        at once from the recorded moments."""
        missing = [n for n, s in zip(self.names, self.stats) if s is None]
        if missing:
            raise RuntimeError(f"BN layers not reached by the forward pass: {missing[:3]}")
        if self._recorded is None:
            first = torch.cat([f for f, _ in self.stats])  # type: ignore[misc]
            sizes = [f.numel() for f, _ in self.stats]  # type: ignore[misc]
            key = (first.device, tuple(self.counts), tuple(sizes), tuple(self.groups))
            layout = self._layouts.get(key)
            if layout is None:  # built once per input size, not every iteration
                layout = self._layouts[key] = _Layout(sizes, self.groups, self.counts, first.device)
            self._layout = layout
            means, variances = layout(first, torch.cat([h for _, h in self.stats]))  # type: ignore[misc]
            if any(c is not None for c in self.folded):  # moments of y = scale x + shift -> of x
                offset, inverse, inverse_sq = self._unfolding(layout.channels, means.device)
                means, variances = torch.addcmul(offset, means, inverse), variances * inverse_sq
            self._recorded = means, variances
        return self._recorded

    def _unfolding(self, channels: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
        """(-shift / scale, 1 / scale, 1 / scale^2) over all layers' channels (0, 1, 1 for a layer
        not folded), built again only when the folded layers or their maps change."""
        folded = tuple(self.folded)
        cached = self._unfold
        if cached is None or len(cached[0]) != len(folded) or any(a is not b for a, b in zip(cached[0], folded)):
            inverse = torch.cat([torch.ones(c, device=device) if f is None else 1.0 / f.scale
                                 for f, c in zip(folded, channels)])
            shift = torch.cat([torch.zeros(c, device=device) if f is None else f.shift
                               for f, c in zip(folded, channels)])
            cached = self._unfold = (folded, -shift * inverse, inverse, inverse * inverse)
        return cached[1:]

    def recorded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, biased var) of each layer's input in the last `recording()` block (views of
        `recorded_flat`)."""
        means, variances = self.recorded_flat()
        sizes = self._layout.channels
        return list(zip(means.split(sizes), variances.split(sizes)))

    def remove(self) -> None:
        """Stop recording for good (later `recording()` blocks leave the layers alone)."""
        self._removed = True
