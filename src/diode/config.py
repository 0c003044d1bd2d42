"""Settings as nested dataclasses: the single source of truth for every option.

Each field has a one-line comment; constructors validate and raise ValueError naming the key.
Runs write their resolved settings to `config.yaml` in their output folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class AugmentConfig:
    flip_p: float = 0.5  # probability of a horizontal flip
    scale: tuple[float, float] = (0.7, 1.4)  # zoom factor range (log-uniform)
    translate: float = 0.15  # max shift as a fraction of the image side
    hue: float = 0.05  # max hue rotation as a fraction of a full turn
    saturation: float = 0.5  # saturation factor in [1 - s, 1 + s]
    value: float = 0.35  # brightness factor in [1 - v, 1 + v]
    min_visible: float = 0.4  # drop a box keeping less than this fraction of its area in the image

    def __post_init__(self) -> None:
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
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
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        for key in ("epochs", "batch_size", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict:
        return asdict(self)
