"""Conv + frozen BN pairs run as one convolution while the BN statistics are recorded
(`BNStatsRecorder` given the network): where they are (`chains`), whether a pair can fold now and
its folded weight and bias (`fold`). The recorder takes the statistics of the folded output back
to the BN input's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as nn_module

if TYPE_CHECKING:
    from diode.synthesis.bn_stats import _Channel

_FOLD_MIN_SCALE = 1e-3  # smallest |scale| / max(1, |shift|) of a channel folded into its conv


def hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks of its own, which a fold would skip (global ones:
    `global_hooks`)."""
    d = module.__dict__
    return bool(d.get("_forward_hooks") or d.get("_forward_pre_hooks") or d.get("_backward_hooks")
                or d.get("_backward_pre_hooks"))


def global_hooks() -> bool:
    """Whether hooks registered for every module are set (a fold would skip them)."""
    return any(getattr(nn_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                           "_global_backward_hooks", "_global_backward_pre_hooks"))


def _passes_through(module: nn.Module) -> bool:
    """An activation module of torch.nn (or Identity): reads its input and, with its `inplace`
    flag off, leaves it untouched."""
    return isinstance(module, nn.Identity) or type(module).__module__ == nn.SiLU.__module__


class Chain(NamedTuple):
    """A module whose forward applies its children `names` in order (an `nn.Sequential` with
    Sequential's forward, or a block a detector declares) holding Conv2d -> selected BN ->
    activation triples: `pairs` maps the position of each such conv to the recorder index of the
    BN after it."""
    module: nn.Module
    names: tuple[str, ...]
    children: tuple[nn.Module, ...]
    pairs: dict[int, int]
    activations: tuple[nn.Module, ...]

    def unchanged(self) -> bool:
        """Its children are still those found (and a Sequential has no others)."""
        modules = self.module.__dict__["_modules"]
        return (tuple(modules.get(n) for n in self.names) == self.children
                and (not isinstance(self.module, nn.Sequential) or len(modules) == len(self.names)))


def chains(root: nn.Module, layers: list[nn.Module],
            blocks: list[tuple[nn.Module, tuple[str, ...]]] = ()) -> list[Chain]:
    """The Sequential containers under `root`, and the `blocks` (module, names of the children
    its forward applies in order), in which a selected BN layer directly follows an nn.Conv2d
    and is directly followed by an activation module."""
    index = {id(m): i for i, m in enumerate(layers)}
    candidates = [(m, tuple(m._modules)) for m in root.modules()
                  if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward]
    found = []
    for module, names in candidates + list(blocks):
        children = tuple(module._modules.get(n) for n in names)
        pairs = {pos - 1: index[id(bn)] for pos, bn in enumerate(children[1:-1], start=1)
                 if id(bn) in index and type(children[pos - 1]) is nn.Conv2d and _passes_through(children[pos + 1])}
        if pairs:
            found.append(Chain(module, names, children, pairs, tuple(children[pos + 2] for pos in pairs)))
    return found


class Fold(NamedTuple):
    """A conv and the frozen BN after it as one convolution, y = conv(x; weight * scale, bias *
    scale + shift), with the BN's affine map (`_Channel`) to take y's statistics back to x's."""
    index: int
    conv: nn.Conv2d
    weight: torch.Tensor
    bias: torch.Tensor
    channel: _Channel


def fold(index: int, conv: nn.Conv2d, bn: nn.Module, channel: _Channel | None) -> Fold | None:
    """The `Fold` of conv and bn, or None where they cannot run as one: a BN that is not a fixed
    affine map now (`channel` None), a conv that is not a plain frozen fp32 nn.Conv2d, hooks on
    either, or a channel whose scale is too small to divide its statistics by."""
    weight = conv.weight
    if (channel is None or "forward" in conv.__dict__ or weight.dtype != torch.float32
            or any(p.requires_grad for p in conv.parameters(recurse=False)) or hooked(conv) or hooked(bn)):
        return None
    scale, shift = channel.scale, channel.shift
    if not bool((scale.abs() >= _FOLD_MIN_SCALE * shift.abs().clamp(min=1.0)).all()):
        return None
    with torch.no_grad():
        folded = weight * scale.view(-1, 1, 1, 1)  # keeps the weight's memory format
        bias = shift if conv.bias is None else torch.addcmul(shift, conv.bias, scale)
    return Fold(index, conv, folded, bias, channel)
