"""The detector protocol every teacher, student and verifier satisfies (STYLE.md).

- ``loss(images, targets) -> dict[str, Tensor]``: named, unweighted loss terms, differentiable
  w.r.t. the images; ``loss_weights`` says how the detector's own training weights them.
- ``predict(images, score_thresh=None, iou_thresh=None) -> list[Prediction]``: post-processed
  detections (NMS) in the data contract; the thresholds override the detector's defaults.
- ``bn_layers()``: every module holding ``running_mean``/``running_var`` buffers (frozen BN too).
- ``loss_mode()``: a context in which heads compute training losses while every BN layer uses and
  keeps its running statistics (what model inversion needs: DIODE section 1).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from diode.types import ImageSize, Prediction, Target


def _has_running_stats(module: nn.Module) -> bool:
    """Whether `module` holds running_mean and running_var tensors (buffers, or plain attributes),
    read from its dicts: `getattr` through nn.Module raises and catches AttributeError for every
    other module, which made listing the BN layers cost ~0.4 ms on the bundled teacher."""
    d = module.__dict__
    buffers = d.get("_buffers", {})
    return all(isinstance(buffers.get(key, d.get(key)), torch.Tensor) for key in ("running_mean", "running_var"))


class Detector(nn.Module):
    """Base class: holds the class names and working image size and implements the BN helpers."""

    arch: str = ""
    # True when the detector only accepts inputs of exactly `image_size` (e.g. the torchvision
    # adapter pins its transform to it); synthesis then runs low-resolution stages as pixels at the
    # stage resolution upsampled to `image_size` instead of feeding the detector smaller images.
    fixed_input_size: bool = False

    def __init__(self, class_names: list[str], image_size: ImageSize) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("class_names must not be empty")
        self.class_names = list(class_names)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.loss_weights: dict[str, float] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def loss(self, images: torch.Tensor, targets: list[Target]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, images: torch.Tensor, score_thresh: float | None = None,
                iou_thresh: float | None = None) -> list[Prediction]:
        raise NotImplementedError

    def raw_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw head outputs before decoding/NMS (for output-matching distillation)."""
        raise NotImplementedError(f"{type(self).__name__} exposes no raw head outputs")

    def objectness(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-location object probability for each raw output level (same leading shape, no channel)."""
        raise NotImplementedError(f"{type(self).__name__} exposes no objectness")

    def soft_distill(self, student_outputs: list[torch.Tensor],
                     teacher_outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense soft-target distillation terms (named, already weighted) between a student's and a
        teacher's raw outputs of this head layout, in the detector's own output space."""
        raise NotImplementedError(f"{type(self).__name__} defines no soft-target distillation")

    def weighted_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The detector's own training objective: its loss terms weighted by ``loss_weights``."""
        return sum(self.loss_weights.get(k, 1.0) * v for k, v in terms.items())

    def network(self) -> nn.Module:
        """The module holding the dense network (what `compile_network` compiles): the detector
        itself when its `loss` and `predict` run it as ``self(images)``; adapters whose loss goes
        through another module name it, leaving target matching with data-dependent shapes eager."""
        return self

    def bn_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every layer with running statistics, in forward-definition order."""
        return [(name, m) for name, m in self.named_modules() if _has_running_stats(m)]

    def sequential_blocks(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """Modules other than ``nn.Sequential`` whose forward is exactly their children of these
        names applied in order (e.g. conv -> BN -> activation blocks): while synthesising, a frozen
        BN between a conv and an activation in one of them (or in a Sequential) runs folded into
        the conv (`BNStatsRecorder`). None here; adapters of model families name theirs."""
        return []

    @contextlib.contextmanager
    def loss_mode(self) -> Iterator["Detector"]:
        """Training-mode heads with every BN layer in eval mode; restores the previous modes."""
        modules = list(self.modules())
        modes = [(m, m.training) for m in modules]
        if any(cls.train is not nn.Module.train for cls in {type(m) for m in modules}):
            self.train()  # a module's own train() (e.g. one that keeps its BN frozen) has its say
            for _, bn in self.bn_layers():
                bn.eval()
        else:
            # What train() then eval() on each BN layer would leave, each flag set once: nn.Module's
            # train() recurses through every child and sets the flag with its __setattr__, which
            # made this ~1 ms a call on the bundled teacher (the synthesis loop enters it every
            # iteration; benchmarks/loop_parts.py `loss_mode_ms`).
            frozen = {id(sub) for m in modules if _has_running_stats(m) for sub in m.modules()}
            for m in modules:
                object.__setattr__(m, "training", id(m) not in frozen)
        try:
            yield self
        finally:
            # Each module's own flag back, without nn.Module's __setattr__: `m.train(flag)` on
            # every module would recurse into its children each time (quadratic in the depth).
            for m, training in modes:
                object.__setattr__(m, "training", training)


def compile_network(detector: Detector, **options) -> Callable[[], None]:
    """Compile `detector.network()`'s forward with ``torch.compile`` in place (fixed shapes unless
    `options` say otherwise); returns a function that puts the eager forward back.

    The BN statistics recorder keeps working: its per-layer forwards are traced into the graph
    (as plain reductions the compiler fuses with the layers). Each input size and mode (a
    multi-resolution stage, prediction without gradient) compiles once.
    """
    module = detector.network()
    previous = module.__dict__.get("forward")
    module.forward = torch.compile(module.forward, dynamic=options.pop("dynamic", False), **options)

    def restore() -> None:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
    return restore
