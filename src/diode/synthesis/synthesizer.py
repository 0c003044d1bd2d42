"""The DIODE optimisation loop: one batch of images from noise to a labelled synthetic batch.

Per iteration (METHOD.md section 1): upsample the pixel parameters to the stage resolution,
augment images and boxes together, compute the named loss terms (teacher's task loss in
`loss_mode`, BN feature-distribution terms from hooks, total variation, image L2), weight them
in one place, step Adam on the pixels, clamp to [0, 1]. Stages run in order (multi-resolution:
each stage starts from the previous one's images, upsampled); optional tiling composes a grid of
finished images into multi-object images and refines them at full resolution (the refine stage's
`scale` / `pixel_scale` are not used). A detector with `fixed_input_size` sees every stage at the
output size, its low-resolution stages optimising pixels at the stage resolution, upsampled.
False positives the teacher sees are promoted to targets on
an explicit schedule (section 2). `bn_first` is the first *selected* BN layer (the network's
first when all layers are hooked, as in the paper).

Nothing here writes files: the loop returns results and calls `callback(event, info)`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from diode.config import LossWeights, StageConfig, SynthesisConfig
from diode.detectors.base import Detector
from diode.synthesis.augment import augment_synthesis
from diode.synthesis.bn_stats import BNStatsRecorder, select_bn_layers
from diode.synthesis.fp_aggregation import aggregate_false_positives
from diode.synthesis.priors import BNLoss, image_l2, tv_l1, tv_l2
from diode.synthesis.tiling import tile_images
from diode.types import ImageSize, Target

Callback = Callable[[str, dict], None]
TERMS = ("task", "bn", "bn_first", "tv_l1", "tv_l2", "l2")


@dataclass
class SynthesisResult:
    images: torch.Tensor  # [B', 3, H, W] in [0, 1], detached (B' = B / tiles when tiling)
    targets: list[Target]  # final targets on the CPU, aggregated false positives included
    losses: dict[str, float]  # last logged unweighted terms and the weighted total
    history: list[dict] = field(default_factory=list)  # {"iteration", terms..., "total"} every log_every
    iterations: int = 0
    fp_added: int = 0


def use_channels_last(device: torch.device, requested: bool | None = None) -> bool:
    """Whether synthesis runs the teacher in channels_last memory format: as `requested`, by
    default on the CPU only (synthesis 6-13 % faster there with it for the three teachers measured,
    results/perf.md session 7; not measured that way on a GPU, so off there unless asked)."""
    return device.type == "cpu" if requested is None else requested


def _stage_size(image_size: ImageSize, scale: float, multiple: int) -> ImageSize:
    """Each side scaled and rounded to a multiple the detector accepts (so a low-resolution stage
    of a non-square image may not keep its exact aspect; boxes are scaled the same way)."""
    return tuple(max(multiple, int(round(s * scale / multiple)) * multiple) for s in image_size)  # type: ignore[return-value]


def _scale_targets(targets: list[Target], sy: float, sx: float) -> list[Target]:
    factor = torch.tensor([sx, sy, sx, sy])
    return [{"boxes": t["boxes"] * factor, "labels": t["labels"]} for t in targets]


def _lr(stage: StageConfig, it: int, lr_scale: float) -> float:
    progress = it / max(1, stage.iterations)
    return lr_scale * (stage.lr_min + (stage.lr - stage.lr_min) * 0.5 * (1 + math.cos(math.pi * progress)))


class Synthesizer:
    """Inverts a frozen teacher. Reusable across batches (hooks are attached once)."""

    def __init__(self, teacher: Detector, cfg: SynthesisConfig, *, size_multiple: int = 32) -> None:
        self.teacher = teacher.eval()
        # Only the pixels are optimised: no gradient buffers for the weights (restored on close).
        self._requires_grad = [(p, p.requires_grad) for p in teacher.parameters()]
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.size_multiple = size_multiple
        layers = select_bn_layers(teacher.bn_layers(), cfg.bn.layers)
        self.recorder = BNStatsRecorder(layers, root=teacher, blocks=teacher.sequential_blocks())
        self.device = next(teacher.parameters()).device

    def close(self) -> None:
        self.recorder.remove()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _bn_loss(self) -> BNLoss:
        """The BN term of `cfg.bn` against the selected layers' running statistics (built per stage)."""
        bn = self.cfg.bn
        return BNLoss(self.recorder.running(), bn.p, bn.mean_weight, bn.var_weight, normalize=bn.normalize)

    def _losses(self, images: torch.Tensor, targets: list[Target], weights: LossWeights,
                bn_loss: BNLoss, log: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, unweighted terms). Image priors with weight 0 cost nothing: they are
        computed, without gradient, only when `log` asks for every term's value."""
        terms: dict[str, torch.Tensor] = {}
        with self._autocast(), self.recorder.recording(), self.teacher.loss_mode():
            task_terms = self.teacher.loss(images, targets)
        terms["task"] = self.teacher.weighted_loss(task_terms).float()
        per_layer = bn_loss.per_layer(*self.recorder.recorded_flat())
        terms["bn"] = per_layer.sum()
        terms["bn_first"] = per_layer[0]  # the first selected layer's own term
        for name, fn in (("tv_l1", tv_l1), ("tv_l2", tv_l2), ("l2", image_l2)):
            if getattr(weights, name):
                terms[name] = fn(images)
            elif log:
                with torch.no_grad():
                    terms[name] = fn(images.detach())
        total = sum((getattr(weights, k) * terms[k] for k in TERMS if getattr(weights, k)), terms["task"] * 0.0)
        return total, terms

    def _run_stage(self, params: torch.Tensor, targets: list[Target], stage: StageConfig, stage_size: ImageSize,
                   gen: torch.Generator, start_iter: int, result: SynthesisResult,
                   callback: Callback | None, lr_scale: float) -> tuple[torch.Tensor, list[Target]]:
        """Optimise `params` (pixels at the pixel resolution) for one stage; returns (params, targets)."""
        params = params.detach().clone().requires_grad_(True)
        # One fused kernel for the whole update where torch has it (CPU and CUDA).
        fused = params.device.type in ("cpu", "cuda")
        optimizer = torch.optim.Adam([params], lr=stage.lr, betas=stage.betas, eps=1e-8, fused=fused)
        bn_loss = self._bn_loss()
        jitter = int(round(stage.jitter * min(stage_size)))
        fp = self.cfg.fp
        logged: list[torch.Tensor] = []
        for it in range(stage.iterations):
            global_it = start_iter + it
            for group in optimizer.param_groups:
                group["lr"] = _lr(stage, it, lr_scale)
            images = self._render(params, stage_size)
            aug_images, aug_targets = augment_synthesis(images, targets, self.cfg.augment, jitter, gen)
            log = (it + 1) % self.cfg.log_every == 0 or it + 1 == stage.iterations
            total, terms = self._losses(aug_images, aug_targets, stage.weights, bn_loss, log)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            with torch.no_grad():
                params.clamp_(0, 1)
            if log:
                logged.append(torch.stack([terms[k].detach().float() for k in TERMS] + [total.detach().float()]))
                result.history.append({"iteration": global_it + 1})
            if fp.enabled and fp.due(global_it):
                with torch.no_grad():
                    predictions = self._predict(self._render(params, stage_size), fp.nms_score_thresh, fp.nms_iou_thresh)
                targets, added = aggregate_false_positives(predictions, targets, stage_size, fp)
                targets = [{k: v.cpu() for k, v in t.items()} for t in targets]
                result.fp_added += added
            if callback is not None:
                callback("iteration", {"iteration": global_it + 1})
        if logged:  # one host transfer for all the logged values of the stage
            values = torch.stack(logged).cpu().tolist()
            for row, entry in zip(values, result.history[-len(logged):]):
                entry.update({k: v for k, v in zip(TERMS + ("total",), row)})
        return params.detach(), targets

    def _render(self, params: torch.Tensor, stage_size: ImageSize) -> torch.Tensor:
        if tuple(params.shape[-2:]) == tuple(stage_size):
            return params
        return F.interpolate(params, size=stage_size, mode="bilinear", align_corners=False)

    def _predict(self, images: torch.Tensor, score_thresh: float, iou_thresh: float):
        with self._autocast():
            return self.teacher.predict(images, score_thresh=score_thresh, iou_thresh=iou_thresh)

    def synthesize(self, targets: list[Target], image_size: ImageSize, gen: torch.Generator,
                   init: torch.Tensor | None = None, callback: Callback | None = None,
                   lr_scale: float = 1.0) -> SynthesisResult:
        """Synthesise one batch for `targets` (in the `image_size` frame, on the CPU).

        `lr_scale` multiplies every stage's learning rate (used to retry a diverged batch).
        """
        cfg = self.cfg
        b = len(targets)
        if cfg.tiling.enabled and b % (cfg.tiling.grid[0] * cfg.tiling.grid[1]):
            raise ValueError(f"tiling grid {cfg.tiling.grid} needs a multiple of "
                             f"{cfg.tiling.grid[0] * cfg.tiling.grid[1]} images, got {b}")
        result = SynthesisResult(images=torch.empty(0), targets=targets, losses={})
        h, w = image_size
        if init is None:
            # Paper: pixels start as clamp(N(0, 1), 0, 1), drawn at the first stage's pixel grid.
            first = cfg.stages[0]
            size = _stage_size(_stage_size(image_size, first.scale, self.size_multiple), first.pixel_scale, 1)
            init = torch.randn((b, 3, *size), generator=gen).clamp(0, 1)
        params = init.to(self.device)
        iteration = 0
        for stage in cfg.stages:
            stage_size = _stage_size(image_size, stage.scale, self.size_multiple)
            pixel_size = _stage_size(stage_size, stage.pixel_scale, 1)
            if self.teacher.fixed_input_size:
                # The teacher takes image_size only: a low-resolution stage keeps its pixel grid
                # and is upsampled to the teacher's size (multi-resolution as parameterisation).
                stage_size = tuple(image_size)
            params = F.interpolate(params, size=pixel_size, mode="bilinear", align_corners=False) \
                if tuple(params.shape[-2:]) != tuple(pixel_size) else params
            # Targets live in the output frame; each stage sees them scaled to its resolution.
            stage_targets = _scale_targets(targets, stage_size[0] / h, stage_size[1] / w)
            params, stage_targets = self._run_stage(params, stage_targets, stage, stage_size, gen, iteration,
                                                    result, callback, lr_scale)
            targets = _scale_targets(stage_targets, h / stage_size[0], w / stage_size[1])
            iteration += stage.iterations
        images = self._render(params, image_size).clamp(0, 1)
        if cfg.tiling.enabled:
            images, targets = tile_images(images, targets, cfg.tiling.grid, image_size)
            refine = cfg.tiling.refine
            params, targets = self._run_stage(images, targets, refine, image_size, gen, iteration, result, callback,
                                              lr_scale)
            images = params.clamp(0, 1)
            iteration += refine.iterations
        result.images = images.detach()
        result.targets = [{k: v.cpu() for k, v in t.items()} for t in targets]
        result.iterations = iteration
        if result.history:
            result.losses = {k: v for k, v in result.history[-1].items() if k != "iteration"}
        return result
