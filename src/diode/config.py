"""Settings as nested dataclasses: the single source of truth for every option.

Each field has a one-line comment; constructors validate and raise ValueError naming the key.
Runs write their resolved settings to `config.yaml` in their output folder.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field


@dataclass
class AugmentConfig:
    flip_p: float = 0.5  # probability of a horizontal flip
    scale: tuple[float, float] = (0.8, 1.3)  # zoom factor range (log-uniform)
    translate: float = 0.1  # max shift as a fraction of the image side
    hue: float = 0.05  # max hue rotation as a fraction of a full turn
    saturation: float = 0.5  # saturation factor in [1 - s, 1 + s]
    value: float = 0.35  # brightness factor in [1 - v, 1 + v]
    min_visible: float = 0.4  # drop a box keeping less than this fraction of its area in the image
    mosaic_p: float = 0.0  # probability that an output image is a 2x2 mosaic of four batch images

    def __post_init__(self) -> None:
        for key in ("flip_p", "mosaic_p"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be an increasing positive range, got {self.scale}")


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the training set
    batch_size: int = 32  # images per optimiser step
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 5e-4  # AdamW decoupled weight decay (conv/linear weights only)
    warmup_epochs: float = 1.0  # linear warm-up length, in epochs
    min_lr_ratio: float = 0.05  # cosine schedule ends at lr * min_lr_ratio
    ema_decay: float = 0.999  # EMA of the weights used for evaluation and checkpoints
    grad_clip: float = 10.0  # max gradient norm
    seed: int = 0  # seeds initialisation, shuffling and augmentation
    eval_every: int = 1  # evaluate on the val set every N epochs (and always at the end)
    checkpoint_every: int = 1  # write last.pt every N epochs (and at every evaluation and the end)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        for key in ("epochs", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LossWeights:
    """Weights of the synthesis loss terms (METHOD.md section 1; paper: task 0.5, bn 0.1,
    bn_first 2.0, tv_l1 75, tv_l2 0)."""

    task: float = 0.5  # the teacher's own detection loss on the requested boxes
    bn: float = 0.1  # feature-distribution matching summed over the hooked BN layers
    bn_first: float = 2.0  # the same term for the first BN layer alone, added again
    tv_l1: float = 75.0  # total variation, mean absolute neighbour difference
    tv_l2: float = 0.0  # total variation, L2 norm of neighbour differences
    l2: float = 0.0  # image L2 norm (DeepInversion; DIODE uses 0)

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"weights.{key} must be >= 0, got {value}")


@dataclass
class SynthAugmentConfig:
    """Box-aware augmentation re-sampled every iteration (METHOD.md section 1, step 1)."""

    flip_p: float = 0.5  # horizontal flip probability (boxes flipped)
    brightness: float = 0.2  # std of the per-image additive brightness offset
    contrast: float = 0.1  # std of the per-image multiplicative contrast change
    erase_p: float = 0.5  # random erasing probability per image (filled with 0)
    erase_area: tuple[float, float] = (0.02, 0.2)  # erased area fraction range
    erase_aspect: tuple[float, float] = (0.3, 3.3)  # erased rectangle aspect range
    scale: tuple[float, float] = (1.0, 1.0)  # random zoom range seen by the teacher (1, 1 = off)

    def __post_init__(self) -> None:
        for key in ("flip_p", "erase_p"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"augment.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("brightness", "contrast"):
            if getattr(self, key) < 0:
                raise ValueError(f"augment.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("erase_area", "erase_aspect", "scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi:
                raise ValueError(f"augment.{key} must be an increasing positive range, got {getattr(self, key)}")


@dataclass
class StageConfig:
    """One optimisation stage; stages run in order, each starting from the previous images."""

    iterations: int = 2000  # optimiser steps in this stage
    scale: float = 1.0  # stage resolution relative to the output image size
    pixel_scale: float = 1.0  # optimised pixel grid relative to the stage resolution (<1: smoother)
    lr: float = 0.2  # peak learning rate (cosine decay to lr_min)
    lr_min: float = 0.0  # final learning rate
    betas: tuple[float, float] = (0.0, 0.0)  # Adam betas; (0, 0) is sign-gradient descent (paper stage 1)
    jitter: float = 0.125  # max roll jitter as a fraction of the stage side (paper 20 px at 160 px)
    weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)
        if self.iterations < 0:
            raise ValueError(f"stages[].iterations must be >= 0, got {self.iterations}")
        if not 0 < self.scale <= 1 or not 0 < self.pixel_scale <= 1:
            raise ValueError(f"stages[].scale and pixel_scale must be in (0, 1], got {self.scale}, {self.pixel_scale}")
        if self.lr <= 0 or self.lr_min < 0 or self.lr_min > self.lr:
            raise ValueError(f"stages[].lr must be > 0 and lr_min in [0, lr], got {self.lr}, {self.lr_min}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"stages[].betas must be in [0, 1), got {self.betas}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"stages[].jitter must be in [0, 1), got {self.jitter}")


@dataclass
class TargetConfig:
    """Which boxes to draw (METHOD.md section 2)."""

    sampler: str = "one-box"  # one-box (paper), multi-box, or dataset (layout from real labels)
    min_side: float = 0.2  # box side range as a fraction of the image side
    max_side: float = 0.8
    max_aspect: float | None = None  # cap on a box's long side / short side (None: the paper's no cap)
    boxes_per_image: tuple[int, int] = (1, 4)  # multi-box: boxes per image range
    max_iou: float = 0.3  # multi-box: max IoU between boxes of one image
    dataset: str = ""  # sampler=dataset: the labelled dataset whose layouts are used

    def __post_init__(self) -> None:
        if self.sampler not in ("one-box", "multi-box", "dataset"):
            raise ValueError(f"targets.sampler must be one-box, multi-box or dataset, got {self.sampler!r}")
        if not 0 < self.min_side <= self.max_side <= 1:
            raise ValueError(f"targets.min_side/max_side must satisfy 0 < min <= max <= 1, got "
                             f"{self.min_side}, {self.max_side}")
        if self.max_aspect is not None and not self.max_aspect >= 1:
            raise ValueError(f"targets.max_aspect must be >= 1 or null, got {self.max_aspect}")
        if self.sampler == "dataset" and not self.dataset:
            raise ValueError("targets.dataset must name a dataset when targets.sampler is 'dataset'")


@dataclass
class TilingConfig:
    """Multi-object images from a grid of one-box images (METHOD.md section 2)."""

    enabled: bool = False  # compose tiles after the stages, then refine
    grid: tuple[int, int] = (2, 2)  # rows, columns
    refine: StageConfig = field(default_factory=lambda: StageConfig(iterations=200, lr=0.05, lr_min=0.0))

    def __post_init__(self) -> None:
        if isinstance(self.refine, dict):
            self.refine = StageConfig(**self.refine)
        if min(self.grid) < 1:
            raise ValueError(f"tiling.grid must be >= 1 x 1, got {self.grid}")


@dataclass
class BNConfig:
    layers: str | int = "all"  # all, the first N, or comma-separated name globs (e.g. "stage*")
    p: float = 2.0  # norm of the mean/variance differences (not raised to p)
    mean_weight: float = 1.0  # weight of the mean term inside each layer
    var_weight: float = 1.0  # weight of the variance term inside each layer
    # false: the paper's raw differences (a layer's term scales with its activations, so the sum
    # depends on the teacher); true: differences in units of each layer's mean running variance
    # (see priors.bn_loss), comparable across layers and teachers.
    normalize: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError(f"bn.layers: a count must be >= 1, got {self.layers}")
        if self.p <= 0:
            raise ValueError(f"bn.p must be > 0, got {self.p}")
        for key in ("mean_weight", "var_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"bn.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class SynthesisConfig:
    """A synthesis recipe (see configs/*.yaml)."""

    batch_size: int = 32  # images optimised together (BN statistics are over this batch)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    targets: TargetConfig = field(default_factory=TargetConfig)
    augment: SynthAugmentConfig = field(default_factory=SynthAugmentConfig)
    bn: BNConfig = field(default_factory=BNConfig)
    fp: "FPConfig" = None  # type: ignore[assignment]  # false-positive aggregation (set in __post_init__)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    precision: str = "fp32"  # fp32 or bf16 (autocast)
    log_every: int = 50  # iterations between recorded loss values (no host sync in between)

    def __post_init__(self) -> None:
        from diode.synthesis.fp_aggregation import FPConfig

        self.stages = [StageConfig(**s) if isinstance(s, dict) else s for s in self.stages]
        for key, cls in (("targets", TargetConfig), ("augment", SynthAugmentConfig), ("bn", BNConfig),
                         ("tiling", TilingConfig)):
            if isinstance(getattr(self, key), dict):
                setattr(self, key, cls(**getattr(self, key)))
        if self.fp is None:
            self.fp = FPConfig()
        elif isinstance(self.fp, dict):
            self.fp = FPConfig(**self.fp)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        tiles = self.tiling.grid[0] * self.tiling.grid[1]
        if self.tiling.enabled and self.batch_size % tiles:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the tiling grid "
                             f"{self.tiling.grid[0]}x{self.tiling.grid[1]} ({tiles} images per tiled image)")

    @property
    def total_iterations(self) -> int:
        return sum(s.iterations for s in self.stages) + (self.tiling.refine.iterations if self.tiling.enabled else 0)

    def to_dict(self) -> dict:
        return asdict(self)


_INT_LIMIT = 2 ** 63  # larger integers overflow torch and float arithmetic


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(hint: object) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"a list of {len(typing.get_args(hint))} values"
    if origin is list:
        return "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "a mapping"


def _check_value(hint: object, value: object, key: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            check_fields(hint, value, key)
        return
    if origin in (typing.Union, types.UnionType):
        for member in args:
            try:
                _check_value(member, value, key)
                return
            except ValueError:
                continue
        raise ValueError(f"{key} must be {_type_name(hint)}, got {_brief(value)}")
    if origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(args[0], item, f"{key}[{i}]")
        return
    if origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        for i, (member, item) in enumerate(zip(args, value)):
            _check_value(member, item, f"{key}[{i}]")
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int and number and isinstance(value, int):
        if abs(value) >= _INT_LIMIT:
            raise ValueError(f"{key} is out of range, got {_brief(value)}")
        return
    if hint is float and number:
        if isinstance(value, int) and abs(value) >= _INT_LIMIT or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {_brief(value)}")
        return
    if hint in (bool, str, type(None)) and type(value) is hint:
        return
    raise ValueError(f"{key} must be {_type_name(hint)}, got {_brief(value)}")


def check_fields(cls: type, raw: object, where: str = "") -> None:
    """Raise ValueError naming the key where `raw` (parsed YAML) does not fit dataclass `cls`.

    Checks key names and value types recursively (nested settings, lists, pairs, alternatives),
    so the constructors' range checks only ever see values of the declared types. A field whose
    default is None also accepts None.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'settings'} must be a mapping, got {_brief(raw)}")
    from diode.synthesis.fp_aggregation import FPConfig  # lazily, as SynthesisConfig does

    hints = typing.get_type_hints(cls, localns={"FPConfig": FPConfig})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else str(name)
        if name not in fields:
            raise ValueError(f"unknown key {key!r}; valid keys{' of ' + where if where else ''}: {', '.join(fields)}")
        if value is None and fields[name].default is None:
            continue
        _check_value(hints[name], value, key)
